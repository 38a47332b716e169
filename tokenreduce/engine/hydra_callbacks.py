"""Hydra callbacks of `python -m tokenreduce`: guard earlier runs' directories, collect a multirun."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tokenreduce.engine.collect import collect
from tokenreduce.engine.record import (
    CHECKPOINT_DIR,
    LOCK_FILE,
    RECORD_JSON,
    TASKS_JSON,
    ensure_fresh,
    hold_run_directory,
)
from tokenreduce.errors import ConfigError

log = logging.getLogger(__name__)

HYDRA_FILES = (".hydra",)  # and the job's *.log: all that a run refused before any compute leaves
_new_dirs: set[Path] = set()  # run or sweep directories that did not exist when this process started them
_holding = contextlib.ExitStack()  # the run or sweep directory this process holds (`hold_run_directory`)


def discard_refused_run(output_dir: str | Path) -> bool:
    """Remove the run directory of a run refused before any compute: only when this run created it
    and it holds nothing but Hydra's own files. True when removed. The refused run's directory is
    released first."""
    _holding.close()
    output_dir = Path(output_dir).resolve()
    if not output_dir.is_dir() or not any(output_dir == new or new in output_dir.parents for new in _new_dirs):
        return False
    entries = list(output_dir.iterdir())
    if any(e.name not in (*HYDRA_FILES, LOCK_FILE) and not (e.is_file() and e.suffix == ".log") for e in entries):
        return False
    shutil.rmtree(output_dir)
    return True


def _refuse(err: ConfigError) -> None:
    _holding.close()  # released, and removed where this run made it and it is still empty
    print(f"tokenreduce: error: {err}", file=sys.stderr)
    raise SystemExit(2)


class FreshRunDirectory(Callback):
    """Stop before Hydra writes anything (its .hydra/ files, the log) into a directory that holds an
    earlier run's results, which happens only when hydra.run.dir or hydra.sweep.dir is set by hand,
    or that another run holds (`hold_run_directory`, held from here until the run or multirun ends)."""

    @staticmethod
    def _hold(directory: Path) -> None:
        # an earlier run of this process that ended with SystemExit (refused, interrupted) never reached on_run_end
        _holding.close()
        try:
            _holding.enter_context(hold_run_directory(directory))
        except ConfigError as err:
            _refuse(err)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from tokenreduce.engine.run import launched_rank_zero

        if not launched_rank_zero():  # a DDP worker shares rank 0's directory
            return
        run_dir = Path(config.hydra.run.dir)
        if not run_dir.exists():
            _new_dirs.add(run_dir.resolve())
        self._hold(run_dir)
        try:
            ensure_fresh(run_dir)
        except ConfigError as err:
            _refuse(err)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        _holding.close()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from tokenreduce.engine.run import launched_rank_zero

        if not launched_rank_zero():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            _new_dirs.add(sweep_dir.resolve())
        self._hold(sweep_dir)
        earlier = next(iter(sweep_dir.rglob(RECORD_JSON)), None) or next(iter(sweep_dir.rglob(CHECKPOINT_DIR)), None)
        if earlier is not None:
            _refuse(ConfigError(
                f"the sweep directory {sweep_dir} already holds {earlier} from an earlier run; a run never "
                "overwrites results: use a new hydra.sweep.dir (the default is a new timestamped folder)"
            ))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        _holding.close()


class CollectOnMultirunEnd(Callback):
    """When a multirun ends, collect its records into its sweep directory (table and plots)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and any(sweep_dir.rglob(TASKS_JSON)):
            from tokenreduce.engine.hf_tasks import collect_task_results  # torch only when needed

            try:
                print(f"collected the transformers-task runs of {sweep_dir}: {collect_task_results(sweep_dir)}")
            except ConfigError as err:  # e.g. an earlier summary is there; each run's results are in place
                print(f"tokenreduce: task results not collected: {err}", file=sys.stderr)
        if not any(sweep_dir.rglob(RECORD_JSON)):
            return
        try:
            import matplotlib  # noqa: F401

            plots = True
        except ImportError:
            log.warning("matplotlib is not installed: writing the results table without plots")
            plots = False
        try:
            written = collect([sweep_dir], sweep_dir, plots=plots)
        except ConfigError as err:  # e.g. no run finished; every run's own results are in place
            print(f"tokenreduce: results not collected: {err}", file=sys.stderr)
            return
        print(f"collected the runs of {sweep_dir}: " + ", ".join(str(p) for p in written.values()))


def register_sweeper() -> bool:
    """Make the project's sweeper known to Hydra; False when it is not installed. Hydra finds plugins by
    listing the `hydra_plugins` namespace, which an editable install's import hook cannot list, so it
    is imported and registered by hand (before Hydra builds the sweeper: multirun callbacks start first)."""
    from hydra.core.plugins import Plugins

    try:
        from hydra_plugins.tokenreduce_sweeper import BaselineSweeper
    except ImportError:
        return False
    Plugins.instance().register(BaselineSweeper)
    return True


class CheckEveryJob(Callback):
    """Before a multirun's first job computes, compose every job's configuration and check it
    (`run.prepare`): one wrong value among the sweep's is refused at once, not after the jobs
    before it have run."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from tokenreduce.engine.run import prepare
        from tokenreduce.engine.sweeps import BASIC, SWEEPER, planned_jobs

        if config.hydra.sweeper.get("_target_") not in (BASIC, SWEEPER):
            return  # another sweeper chooses its jobs as it goes
        if config.hydra.sweeper.get("_target_") == SWEEPER and not register_sweeper():
            _refuse(ConfigError(f"hydra.sweeper: {SWEEPER} is not installed in this environment (an install from "
                                "before it); allowed: reinstall tokenreduce (pip install -e . in a checkout), or "
                                "hydra/sweeper=basic, which adds no baseline"))
        loader = GlobalHydra.instance().config_loader()
        try:  # the sweep's values and its added baselines, as the sweeper will launch them
            jobs = planned_jobs(config, lambda job: loader.load_sweep_config(config, list(job)))
        except ConfigError as err:
            _refuse(err)
        for number, job in enumerate(jobs):
            try:
                prepare(loader.load_sweep_config(config, list(job)), list(job))
            except ConfigError as err:
                _refuse(ConfigError(f"job {number} ({' '.join(job)}) of {len(jobs)}: {err}; no job has run"))
