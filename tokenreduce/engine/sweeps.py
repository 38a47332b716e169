"""The jobs of a multirun: Hydra's grid of the command line's and `hydra.sweeper.params`' values, and
after it the unreduced baseline the grid's runs are measured against (`planned_jobs`).

A reduced run's speed-up and MAC fraction need an unreduced run of the same protocol beside it. Jobs
whose configurations differ only in the reducer (`protocol_of`) form one group; a group of a task that
measures one model per run (`Task.baseline`: evaluate, finetune) and has no job with `reducer=none`
gets one: its first job's overrides without the reducer's, with `reducer=none`. The added jobs come
after the grid, so the grid keeps Hydra's job numbers. `hydra.sweeper.baseline=false` leaves them out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from tokenreduce.engine.config import top_key
from tokenreduce.errors import ConfigError

log = logging.getLogger(__name__)

SWEEPER = "hydra_plugins.tokenreduce_sweeper.BaselineSweeper"  # conf/hydra/sweeper/baseline.yaml
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# settings that belong to the reducer: a baseline leaves them out, and they do not split a group
REDUCER_OWNED = ("reducer", "loss.reducer_weights")


def reducer_override(override: str) -> bool:
    """Whether a command-line override sets the reducer (`reducer=...`, `reducer.r=...`, a reducer file's
    `+reducer_file@reducer=...`) or its loss weights."""
    key = override.lstrip("+~").split("=", 1)[0]
    return top_key(override) == "reducer" or any(key == k or key.startswith(f"{k}.") for k in REDUCER_OWNED[1:])


def grid(params: dict | None, arguments: list[str]) -> list[list[str]]:
    """Each job's overrides as Hydra's basic sweeper makes them: `params` first, then `arguments`."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in (params or {}).items()),
                                                       *arguments])
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def protocol_of(cfg: DictConfig) -> str:
    """A job's configuration apart from Hydra's settings and the reducer's, as comparable text
    (interpolations unresolved, so a timestamp or a missing variable cannot split a group)."""
    settings = OmegaConf.to_container(cfg, resolve=False)
    settings.pop("hydra", None)
    settings.pop("reducer", None)
    (settings.get("loss") or {}).pop("reducer_weights", None)
    return json.dumps(settings, sort_keys=True, default=str)


def _wants_baseline(cfg: DictConfig):
    """The task of `cfg` when a sweep of it needs an unreduced run, else None (an unknown task too:
    checking every job refuses it by name)."""
    from tokenreduce.engine.tasks import get_task
    from tokenreduce.engine.tasks.common import import_plugins

    try:
        import_plugins(cfg.get("imports") or [])
        task = get_task(cfg.get("task"))
    except ConfigError:
        return None
    return task if task.baseline else None


def baselines(jobs: list[list[str]], compose_job: Callable[[list[str]], DictConfig]) -> list[list[str]]:
    """The unreduced jobs `jobs` lack, one per group of jobs that differ only in the reducer, in the
    order of each group's first job. `compose_job(overrides)` is a job's configuration."""
    groups: dict[str, list[str] | None] = {}  # protocol -> the overrides of its first job; None: has a baseline
    for job in jobs:
        cfg = compose_job(job)
        if _wants_baseline(cfg) is None:
            continue
        key = protocol_of(cfg)
        if cfg.reducer.get("name") == "none":
            groups[key] = None
        else:
            groups.setdefault(key, job)
    added = []
    for first in groups.values():
        if first is None:
            continue
        job = [o for o in first if not reducer_override(o)] + ["reducer=none"]
        cfg = compose_job(job)
        # an experiment of the old kind that sets reducer keys itself: they belong to its reducer, and so
        # do weights of loss terms that no unreduced model reports (an error in a fine-tune)
        job += [f"~reducer.{k}" for k in cfg.reducer if k != "name"]
        if "loss" not in _wants_baseline(cfg).unused:
            job += [f"~loss.reducer_weights.{k}" for k in (cfg.get("loss") or {}).get("reducer_weights") or {}]
        added.append(job)
    return added


def planned_jobs(config: DictConfig, compose_job: Callable[[list[str]], DictConfig],
                 announce: bool = False) -> list[list[str]]:
    """Every job a multirun of `config` launches, each as its overrides: the grid, then with this
    project's sweeper (`SWEEPER`) and `hydra.sweeper.baseline` true the unreduced baselines it lacks
    (logged with `announce`). `compose_job(overrides)` is a job's configuration."""
    sweeper = config.hydra.sweeper
    params = sweeper.get("params")
    jobs = grid(OmegaConf.to_container(params) if params is not None else {}, list(config.hydra.overrides.task))
    if sweeper.get("_target_") != SWEEPER:
        return jobs
    wanted = sweeper.get("baseline", True)
    if not isinstance(wanted, bool):
        raise ConfigError(f"hydra.sweeper.baseline={wanted!r} is invalid; allowed: true (add the unreduced run "
                          "each group of jobs lacks), false")
    if not wanted:
        return jobs
    added = baselines(jobs, compose_job)
    for number, job in enumerate(added, len(jobs)):
        if announce:
            log.info("job %d is the unreduced baseline of the sweep: %s (hydra.sweeper.baseline=false leaves it "
                     "out)", number, " ".join(job))
    return jobs + added
