"""task=search: the per-layer schedule with the best calibration score within `budget`, written as
a reducer file (engine/search.py)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from omegaconf import DictConfig

from tokenreduce.engine import search as schedule_search
from tokenreduce.engine.config import plain, top_key
from tokenreduce.engine.tasks import RunContext, Task, register_task
from tokenreduce.engine.tasks.common import ImageRun
from tokenreduce.engine.tasks.compare import NO_TRAINER, start_model


@dataclass
class Settings:
    search: schedule_search.SearchSettings
    budget: schedule_search.Budget
    image: ImageRun


def check(cfg: DictConfig, overrides: list[str] | None) -> Settings:
    search, budget = schedule_search.settings_from(cfg)
    image = ImageRun.check(cfg, "validate" if cfg.eval_split == "val" else None,
                           probe=bool(plain(cfg.measure)["enabled"]))
    return Settings(search, budget, image)


def evaluate_command(overrides: list[str] | None) -> str:
    """The start of the command that evaluates a searched reducer on the search's own model and data:
    the search's settings less its own, with task=evaluate."""
    if overrides is None:  # run in-process without its command line
        return "python -m tokenreduce <the search's model and data settings> task=evaluate"
    own = ("task", "search", "budget", "reducer", "compare", "hydra")
    kept = [o for o in overrides if top_key(o) not in own]
    return " ".join(["python -m tokenreduce", *map(shlex.quote, kept), "task=evaluate"])


def run(context: RunContext, settings: Settings) -> None:
    model, weights, model_cfg = start_model(context, settings.image)
    schedule_search.run_search(context.cfg, settings.search, settings.budget, context.output_dir, model,
                               settings.image.datamodule, weights, model_cfg["name"], model_cfg.get("adapter_options"),
                               evaluate_command(context.overrides))


TASK = register_task(Task(
    name="search", check=check, run=run, unused=(*NO_TRAINER, "compare"),
    reads="it searches search.reducer and times on measure.device",
))
