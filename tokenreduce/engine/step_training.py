"""What the from-scratch trainings counted in optimizer steps share (task=train_diffusion,
task=train_vlm): their optimizer settings and learning-rate schedule, the checkpoint monitor they
allow, the checks of their settings sections, the fit that says how to resume, and the weights file
they write at the end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import OmegaConf

from tokenreduce.engine.callbacks import RunInterrupted, checkpoint_callback
from tokenreduce.engine.config import plain
from tokenreduce.engine.console import tell
from tokenreduce.engine.loggers import build_loggers, finish_loggers
from tokenreduce.engine.module import warmup_cosine
from tokenreduce.engine.record import staged_file
from tokenreduce.engine.tasks.lightning import build_trainer, resume_command
from tokenreduce.errors import ConfigError, check_number

DECAYS = ("constant", "cosine")


@dataclass
class StepOptim:
    """AdamW after a linear warm-up from 0 over `warmup_steps`, then constant or half a cosine down to
    `min_lr` at the run's last step. A subclass names its settings section (`SECTION`) in refusals."""

    SECTION: ClassVar[str] = "optim"

    lr: float = 3.0e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 500  # linear from 0, then `decay`
    decay: str = "constant"  # or cosine: half a cosine down to min_lr at the run's last step
    min_lr: float = 0.0

    def __post_init__(self):
        where = self.SECTION
        check_number(where, "lr", self.lr, low=0, low_open=True)
        check_number(where, "weight_decay", self.weight_decay, low=0)
        check_number(where, "warmup_steps", self.warmup_steps, low=0, integer=True)
        if self.decay not in DECAYS:
            raise ConfigError(f"{where}.decay={self.decay!r} is invalid; allowed: {', '.join(DECAYS)}")
        check_number(where, "min_lr", self.min_lr, low=0, high=self.lr)
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"{where}.betas={self.betas!r} is invalid; allowed: two numbers in [0, 1)")
        self.betas = betas

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        return tuple(cls.__dataclass_fields__)


def step_schedule(optimizer: torch.optim.Optimizer, optim: StepOptim, module) -> dict:
    """Lightning's scheduler entry for `optim`'s schedule over the optimizer steps of `module`'s
    trainer: every parameter group's own learning rate times the same factor, stepped every step."""
    warmup = optim.warmup_steps
    if optim.decay == "cosine":
        total_steps = int(module.trainer.estimated_stepping_batches)  # asked only here: it sets the loaders up

        def factor(step: int) -> float:
            return warmup_cosine(step, total_steps, warmup, optim.lr, 0.0, optim.min_lr) / optim.lr
    else:
        def factor(step: int) -> float:
            return min(1.0, (step + 1) / (warmup + 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step"}


def check_keys(section: str, given: dict, allowed) -> None:
    """A setting of `section` that is not one of `allowed` is refused, the first by name."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a setting; allowed: {', '.join(allowed)}")


def check_loss_monitor(checkpoint: dict, task: str) -> None:
    """These trainings keep their best checkpoint by the validation loss (or none: the latest only)."""
    if checkpoint.get("monitor") not in ("val/loss", None) or checkpoint.get("mode") != "min":
        raise ConfigError(f"checkpoint.monitor={checkpoint.get('monitor')!r}, checkpoint.mode={checkpoint.get('mode')!r} "
                          f"are invalid for task={task}; allowed: monitor val/loss (or null) with mode min")


@contextmanager
def step_trainer(context, checkpoint: dict, run_name: str) -> Iterator:
    """The run's trainer, writing checkpoints (`checkpoint`: the best by the monitor, and the latest)
    and logging to the config's loggers (with the learning rate where there are loggers); the loggers
    are finished when the block ends."""
    cfg, output_dir = context.cfg, Path(context.output_dir)
    loggers = build_loggers(plain(cfg.logger), output_dir, run_name)
    try:
        callbacks = checkpoint_callback(output_dir, **checkpoint)
        if loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        trainer = build_trainer(cfg.trainer, loggers, callbacks, output_dir, checkpointing=True)
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        yield trainer
    finally:
        finish_loggers(loggers)


def fit(trainer, module, datamodule, context) -> None:
    """`trainer.fit` from the run's `ckpt_path`; a run stopped by a signal says how to resume it."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=context.cfg.get("ckpt_path"))
    except RunInterrupted as stop:
        tell(f"interrupted by {stop.signal_name} at step {stop.step}; resume with:\n  "
             f"{resume_command(context.overrides, stop.checkpoint)}")
        raise


def logged(trainer, key: str) -> float | None:
    """The last value of `key` the trainer's module logged, None when never logged."""
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def save_state_dict(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A state dict as a new safetensors file (with string `metadata` in its header). safetensors
    refuses tensors that share memory: leave tied copies out of `state`."""
    from safetensors.torch import save_file

    with staged_file(path) as temporary:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(temporary), metadata=metadata)
