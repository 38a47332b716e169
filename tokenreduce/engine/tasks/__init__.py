"""The tasks of `python -m tokenreduce task=NAME`, one module each, registered by name.

A task is a `Task`: its name; `check(cfg, overrides)`, which parses and checks every setting it
reads before any model is built and returns its settings object; `run(context, settings)`, which
builds the model, computes and writes its record; and the top-level settings it does not read,
which are refused when given on the command line (`check_settings_used`). `engine/run.py` looks
the task up and runs it; a new task is one module here, its config and its test
(docs/architecture.md shows one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tokenreduce.engine.config import reducer_spec, top_key
from tokenreduce.errors import ConfigError

TRAINING = ("optim", "loss", "checkpoint")  # read by task=finetune only
ONE_MODEL = ("compare", "search", "budget", "text_reducer")  # read by the tasks that run them


@dataclass(frozen=True)
class RunContext:
    """What every task's run is given: the configuration, where to write, and the command line
    (None when run in-process without one), from which resume and evaluate commands are built."""

    cfg: DictConfig
    output_dir: Path
    overrides: list[str] | None = None


@dataclass(frozen=True)
class Task:
    name: str
    check: Callable[[DictConfig, list[str] | None], Any]
    run: Callable[[RunContext, Any], Any]
    unused: tuple[str, ...] = ()  # top-level settings this task does not read
    reads: str = ""  # what it does read instead, said when one of them is refused
    # whether a sweep of it gets an unreduced run in the same protocol (engine/sweeps.py): true where a
    # run measures only its own model; a task that measures the unreduced model itself needs none
    baseline: bool = False


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is registered already")
    _TASKS[task.name] = task
    return task


def available() -> list[str]:
    """The registered tasks' names: the package's own, then any registered by a plugin."""
    _load_builtin()
    return _ordered()


def _ordered() -> list[str]:
    # the package's own in BUILTIN's order, whichever of their modules was imported first
    return [name for name in BUILTIN if name in _TASKS] + [name for name in _TASKS if name not in BUILTIN]


def get_task(name) -> Task:
    """The task registered as `name`; a ConfigError listing the registered ones otherwise."""
    _load_builtin()
    if not isinstance(name, str) or name not in _TASKS:
        raise ConfigError(f"task={name!r} is invalid; allowed: {', '.join(_ordered())}")
    return _TASKS[name]


def check_settings_used(cfg: DictConfig, task: Task, overrides: list[str] | None = None) -> None:
    """Every setting given is honoured, or refused by name: the command line's settings that `task`
    does not read, a reducer where the task runs none of its own, a checkpoint it cannot load."""
    why = f": {task.reads}" if task.reads else ""
    for override in overrides or []:
        key = top_key(override)
        if key in task.unused and key not in ("reducer", "text_reducer"):  # those two: by their value, below
            raise ConfigError(f"{override.lstrip('+~')} is not used by task={task.name}{why}; remove it, or choose "
                              "the task that uses it")
    for key in ("reducer", "text_reducer"):
        if key in task.unused and key in cfg and reducer_spec(cfg[key])[0] != "none":
            raise ConfigError(f"{key}={reducer_spec(cfg[key])[0]} is not used by task={task.name}{why}; allowed: "
                              f"{key}=none")
    if "ckpt_path" in task.unused and cfg.get("ckpt_path") is not None:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not used by task={task.name}{why}; allowed: null")


# the modules of the tasks that ship with the package, imported when the registry is first read (a
# task module imports this one for `register_task`)
BUILTIN = ("evaluate", "finetune", "compare", "search", "retrieval", "zeroshot", "text_classification",
           "video_classification", "audio_classification", "train_diffusion", "train_vlm", "generate", "vqa")


def _load_builtin() -> None:
    for name in BUILTIN:
        importlib.import_module(f"{__name__}.{name}")
