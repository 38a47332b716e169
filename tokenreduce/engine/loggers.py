"""The run's loggers: a CSV log always, Weights & Biases beside it (offline without an API key)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from tokenreduce.errors import ConfigError

LOGGERS = ("csv", "wandb")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def has_wandb_key() -> bool:
    """Whether W&B can log in without a prompt: WANDB_API_KEY, or a `wandb login` entry in the netrc
    file for the W&B host (WANDB_BASE_URL, else wandb's default), found as wandb finds it. Offline."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    host = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth
    except ImportError:  # a wandb without its wbauth package: the netrc entry for the host's name
        try:
            return netrc.netrc().authenticators(urlparse(host).hostname or "") is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            return False
    try:
        return read_netrc_auth(host=host) is not None
    except AuthenticationError:  # an entry that is not a valid key
        return False


def wandb_mode(configured: str) -> str:
    """online, offline or disabled. "auto" follows WANDB_MODE when set, else online only with a key.

    Online without a key is a ConfigError here, one line before the run, rather than wandb's login
    failing with a traceback once it has started (runs are not interactive: no prompt)."""
    if configured not in WANDB_MODES:
        raise ConfigError(f"logger.wandb.mode={configured!r} is invalid; allowed: {', '.join(WANDB_MODES)}")
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if configured != "auto":
        mode, setting = configured, "logger.wandb.mode"
    elif env in ("online", "offline", "disabled", "dryrun"):
        mode, setting = ("offline" if env == "dryrun" else env), "WANDB_MODE"
    else:
        return "online" if has_wandb_key() else "offline"
    if mode == "online" and not has_wandb_key():
        raise ConfigError(f"{setting}='online' needs a W&B API key and none is configured; allowed: a key "
                          f"(WANDB_API_KEY or `wandb login`), {setting}=offline (sync later with `wandb sync`) "
                          f"or disabled, or logger=csv")
    return mode


def check_loggers(logger_cfg: dict | None) -> dict:
    """The `logger` config, checked before the run: known loggers, and a W&B mode that can start."""
    logger_cfg = dict(logger_cfg or {})
    unknown = sorted(set(logger_cfg) - set(LOGGERS))
    if unknown:
        raise ConfigError(f"logger.{unknown[0]} is not a known logger; allowed: {', '.join(LOGGERS)}")
    if "wandb" in logger_cfg:
        wandb_mode((logger_cfg["wandb"] or {}).get("mode", "auto"))
    return logger_cfg


WANDB_GROUP_LIMIT = 128  # characters W&B takes in a group name


def sweep_group(output_dir: str | Path) -> str | None:
    """The W&B group of a run in `output_dir`: when it is a job of the multirun this process runs, the
    sweep directory as configured (`hydra.sweep.dir`, e.g. outputs/sweeps/2025-06-01/12-00-00-000000),
    the same for every job of one multirun and new for the next; else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(str(hydra_cfg.sweep.dir))
    # Hydra's settings outlive a multirun in this process: a later run elsewhere is not one of its jobs
    if hydra_cfg.mode != RunMode.MULTIRUN or sweep_dir.resolve() not in Path(output_dir).resolve().parents:
        return None
    return str(sweep_dir)[-WANDB_GROUP_LIMIT:]  # the end is what tells sweeps apart


def wandb_options(wandb_cfg: dict | None, run_name: str, output_dir: str | Path) -> dict:
    """The `wandb.init` arguments of the run in `output_dir` (WandbLogger's, mode aside): `logger.wandb`,
    named `run_name` unless it names the run, grouped by `sweep_group` unless it sets a group."""
    options = {k: v for k, v in (wandb_cfg or {}).items() if k != "mode"}
    options.setdefault("name", run_name)
    if options.get("group") is None:
        options["group"] = sweep_group(output_dir)
    return options


def build_loggers(logger_cfg: dict | None, output_dir: str | Path, run_name: str) -> list[Logger]:
    """The loggers the `logger` config names, writing under `output_dir`; W&B with `wandb_options`."""
    logger_cfg = check_loggers(logger_cfg)
    loggers: list[Logger] = []
    if "csv" in logger_cfg:
        options = dict(logger_cfg["csv"] or {})
        loggers.append(CSVLogger(save_dir=str(output_dir), name="csv", version="", **options))
    if "wandb" in logger_cfg:
        mode = wandb_mode((logger_cfg["wandb"] or {}).get("mode", "auto"))
        if mode != "disabled":
            options = wandb_options(logger_cfg["wandb"], run_name, output_dir)
            loggers.append(WandbLogger(save_dir=str(output_dir), offline=mode == "offline", **options))
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Flush every logger and end the W&B run, so the next run in this process starts its own."""
    for lg in loggers:
        lg.save()
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish()
