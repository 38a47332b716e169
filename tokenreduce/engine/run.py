"""One run of `python -m tokenreduce`: the configured task (engine/tasks/), looked up and run.

Everything that can be wrong in the configuration is checked before any model is built or any
weight downloaded (`prepare`): the task, the settings it does not read, plugins, and then the task's
own checks (its reducer and parameters, optimisation and loss settings, dataset folders, the
checkpoint to start from). The run directory is held for the run and must hold no earlier results.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig

from tokenreduce.engine.console import pace_seconds
from tokenreduce.engine.record import RunRecord, ensure_fresh, hold_run_directory
from tokenreduce.engine.tasks import RunContext, Task, check_settings_used, get_task
from tokenreduce.engine.tasks.common import build_model, import_plugins, weights_label
from tokenreduce.engine.tasks.lightning import build_trainer, resolve_precision, resume_command
from tokenreduce.errors import ConfigError

__all__ = ["build_model", "build_trainer", "check_task", "launched_rank_zero", "prepare", "resolve_precision",
           "resume_command", "run", "weights_label"]


def launched_rank_zero() -> bool:
    """Whether this process is rank 0 of a distributed launch (or not distributed at all)."""
    return all(int(os.environ.get(key, "0") or 0) == 0 for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def check_task(cfg: DictConfig) -> Task:
    """The registered task `cfg.task`, and a valid `eval_split`."""
    task = get_task(cfg.get("task"))
    split = cfg.get("eval_split")
    if split not in ("val", "test"):
        raise ConfigError(f"eval_split={split!r} is invalid; allowed: val, test")
    return task


def prepare(cfg: DictConfig, overrides: list[str] | None = None):
    """Check every setting of a run before any model is built or any weight read: a ConfigError
    names the first wrong one. The task and what its `check` returned. A multirun checks every job
    this way before the first one runs."""
    import_plugins(cfg.get("imports") or [])  # first: a plugin may register a task as well as a reducer
    pace_seconds()  # a bad $TOKENREDUCE_PROGRESS_SECONDS fails now, not at the first progress line
    task = check_task(cfg)
    check_settings_used(cfg, task, overrides)
    return task, task.check(cfg, overrides)


def run(cfg: DictConfig, output_dir: str | Path, overrides: list[str] | None = None) -> RunRecord | None:
    """Run the configured task, writing into `output_dir`; its record (task=evaluate and finetune,
    on rank 0), else None.

    `overrides` are the command line's (Hydra's) settings, from which an interrupted fine-tune's
    resume command is built. A fine-tune stopped by SIGINT or SIGTERM writes an "interrupted" record
    and raises `RunInterrupted`; a failure after the evaluation writes a "failed" record keeping the
    metrics measured before it, then raises. A second run into a directory that a run holds is
    refused (`hold_run_directory`; rank 0 holds it for every rank).
    """
    with hold_run_directory(output_dir) if launched_rank_zero() else nullcontext():
        output_dir = Path(output_dir)
        if launched_rank_zero():
            ensure_fresh(output_dir)
        task, settings = prepare(cfg, overrides)
        return task.run(RunContext(cfg, output_dir, overrides), settings)
