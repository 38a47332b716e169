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
    """Whether W&B could authenticate: WANDB_API_KEY, or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(configured: str) -> str:
    """online, offline or disabled. "auto" follows WANDB_MODE when set, else online only with a key."""
    if configured not in WANDB_MODES:
        raise ConfigError(f"logger.wandb.mode={configured!r} is invalid; allowed: {', '.join(WANDB_MODES)}")
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_wandb_key() else "offline"


def build_loggers(logger_cfg: dict | None, output_dir: str | Path, run_name: str) -> list[Logger]:
    """The loggers the `logger` config names, writing under `output_dir`."""
    logger_cfg = dict(logger_cfg or {})
    unknown = sorted(set(logger_cfg) - set(LOGGERS))
    if unknown:
        raise ConfigError(f"logger.{unknown[0]} is not a known logger; allowed: {', '.join(LOGGERS)}")
    loggers: list[Logger] = []
    if "csv" in logger_cfg:
        options = dict(logger_cfg["csv"] or {})
        loggers.append(CSVLogger(save_dir=str(output_dir), name="csv", version="", **options))
    if "wandb" in logger_cfg:
        options = dict(logger_cfg["wandb"] or {})
        mode = wandb_mode(options.pop("mode", "auto"))
        if mode != "disabled":
            options.setdefault("name", run_name)
            loggers.append(WandbLogger(save_dir=str(output_dir), offline=mode == "offline", **options))
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Flush every logger and end the W&B run, so the next run in this process starts its own."""
    for lg in loggers:
        lg.save()
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish()
