"""Hydra callbacks of `python -m tokenreduce`: guard earlier runs' directories, collect a multirun."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tokenreduce.engine.collect import collect, find_records
from tokenreduce.engine.record import CHECKPOINT_DIR, RECORD_JSON, ensure_fresh
from tokenreduce.errors import ConfigError

log = logging.getLogger(__name__)


def _refuse(err: ConfigError) -> None:
    print(f"tokenreduce: error: {err}", file=sys.stderr)
    raise SystemExit(2)


class FreshRunDirectory(Callback):
    """Stop before Hydra writes anything (its .hydra/ files, the log) into a directory that holds an
    earlier run's results, which happens only when hydra.run.dir or hydra.sweep.dir is set by hand."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from tokenreduce.engine.run import launched_rank_zero

        if not launched_rank_zero():  # a DDP worker shares rank 0's directory
            return
        try:
            ensure_fresh(Path(config.hydra.run.dir))
        except ConfigError as err:
            _refuse(err)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        earlier = next(iter(sweep_dir.rglob(RECORD_JSON)), None) or next(iter(sweep_dir.rglob(CHECKPOINT_DIR)), None)
        if earlier is not None:
            _refuse(ConfigError(
                f"the sweep directory {sweep_dir} already holds {earlier} from an earlier run; a run never "
                "overwrites results: use a new hydra.sweep.dir (the default is a new timestamped folder)"
            ))


class CollectOnMultirunEnd(Callback):
    """When a multirun ends, collect its records into its sweep directory (table and plots)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not any(sweep_dir.rglob(RECORD_JSON)):
            return
        try:
            import matplotlib  # noqa: F401

            plots = True
        except ImportError:
            log.warning("matplotlib is not installed: writing the results table without plots")
            plots = False
        written = collect([sweep_dir], sweep_dir, plots=plots)
        print(f"collected {len(find_records([sweep_dir]))} runs: " + ", ".join(str(p) for p in written.values()))
