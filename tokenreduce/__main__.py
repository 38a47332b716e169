"""`python -m tokenreduce [experiment=NAME] [key=value ...]`: the Hydra entry point.

    python -m tokenreduce experiment=tome_vit_b data.root=/data/imagenet
    python -m tokenreduce experiment=finetune_tome_deit_s trainer=ddp
    python -m tokenreduce -m experiment=tome_vit_b reducer.r=4,8,12,16
    python -m tokenreduce --cfg job experiment=pitome_vit_b      # print the composed config
    python -m tokenreduce reducer=outputs/runs/.../reducer.yaml   # a reducer config file (task=search writes one)

The configuration ships inside the package (`tokenreduce.conf`), so this works from any directory.
"""

from __future__ import annotations

import logging
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tokenreduce.engine.config import config_source
from tokenreduce.errors import ConfigError


def main() -> None:
    """The command (`python -m tokenreduce`, the `tokenreduce` script): the command line turned into
    Hydra's (`command_line_arguments`: `experiment=null`, `reducer=<file>`), then the run."""
    from tokenreduce.engine.config import command_line_arguments

    try:
        sys.argv[1:] = command_line_arguments(sys.argv[1:])
    except ConfigError as err:
        print(f"tokenreduce: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra_main()


@hydra.main(version_base="1.3", config_path=config_source(), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    # heavy imports only once Hydra has parsed the command line
    from tokenreduce.engine.callbacks import RunInterrupted
    from tokenreduce.engine.console import log_only, survive_lost_reader
    from tokenreduce.engine.hydra_callbacks import discard_refused_run
    from tokenreduce.engine.run import run

    _one_console_handler()
    survive_lost_reader()
    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    try:
        record = run(cfg, output_dir, overrides=list(hydra_cfg.overrides.task))
    except ConfigError as err:
        # a configuration mistake: one clear line, not a traceback, and no empty run directory left behind
        discard_refused_run(output_dir)
        print(f"tokenreduce: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunInterrupted as stop:  # the record (or the search state) and how to resume are written and printed
        raise SystemExit(stop.exit_code) from None
    except BaseException:  # Hydra prints the traceback on the console; the run's log keeps it too
        log_only(f"the run stopped:\n{traceback.format_exc().rstrip()}", logging.ERROR)
        raise
    return record.top1 if record is not None else None


def _one_console_handler() -> None:
    """Lightning gives its loggers console handlers of their own, and stops their messages there when
    it is imported before Hydra set up logging; Hydra's root handlers print them and write the run's
    log file, so without this a Lightning message shows twice, or never reaches the log."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lightning_logger = logging.getLogger(name)
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True
    # the rank-zero logger's records are emitted there, before they propagate: the filter sits on it
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, NoAdvertisement) for f in rank_zero.filters):
        rank_zero.addFilter(NoAdvertisement())


class NoAdvertisement(logging.Filter):
    """Drops Lightning's tip to install its cloud logger, printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


if __name__ == "__main__":
    main()
