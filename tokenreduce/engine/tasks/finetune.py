"""task=finetune: train the reduced model (Lightning; resumable from `ckpt_path`), then evaluate its
best checkpoint by `checkpoint.monitor`."""

from __future__ import annotations

from omegaconf import DictConfig

from tokenreduce.engine.config import plain
from tokenreduce.engine.module import REDUCER_LOSS_PREFIX, logged_metrics
from tokenreduce.engine.tasks import ONE_MODEL, Task, register_task
from tokenreduce.engine.tasks.lightning import ReducedModelSettings, run_reduced_model
from tokenreduce.errors import ConfigError


def check_training_length(trainer_cfg: dict) -> None:
    """A fine-tune's learning-rate schedule spans its whole length, which must be finite."""
    epochs, steps = trainer_cfg.get("max_epochs"), trainer_cfg.get("max_steps")
    if steps not in (None, -1):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"trainer.max_steps={steps!r} is invalid; allowed: an integer >= 1, or -1 (no limit "
                              "by steps)")
        return
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs={epochs!r} is invalid for task=finetune; allowed: an integer >= 1 "
                          "(the learning-rate schedule needs a finite length), or a trainer.max_steps >= 1")


def check_monitor(checkpoint_cfg: dict, num_classes: int | None = None) -> None:
    """`checkpoint.monitor` must be a metric a fine-tune logs, and `checkpoint.mode` min or max."""
    monitor, mode = checkpoint_cfg.get("monitor"), checkpoint_cfg.get("mode")
    allowed = logged_metrics(num_classes)
    if monitor is not None and monitor not in allowed and not str(monitor).startswith(REDUCER_LOSS_PREFIX):
        raise ConfigError(f"checkpoint.monitor={monitor!r} is not a metric the fine-tune logs; allowed: "
                          f"{', '.join(allowed)}, a reducer's {REDUCER_LOSS_PREFIX}<term>, or null (keep the latest)")
    if mode not in ("min", "max"):
        raise ConfigError(f"checkpoint.mode={mode!r} is invalid; allowed: min, max")


def check(cfg: DictConfig, overrides: list[str] | None) -> ReducedModelSettings:
    settings = ReducedModelSettings.check(cfg, overrides, stage="fit")
    check_training_length(plain(cfg.trainer))
    check_monitor(plain(cfg.checkpoint))
    return settings


def run(context, settings: ReducedModelSettings):
    checkpoint_cfg = plain(context.cfg.checkpoint)
    return run_reduced_model(context, "finetune", settings,
                             extra_check=lambda model: check_monitor(checkpoint_cfg, model.num_classes))


# a sweep's baseline is the unreduced fine-tune of the same recipe: fine-tuning alone changes top-1
TASK = register_task(Task(name="finetune", check=check, run=run, unused=ONE_MODEL, baseline=True))
