"""tokenreduce's Hydra sweeper: Hydra's basic grid, then the unreduced baseline each group of its jobs
lacks (`tokenreduce.engine.sweeps`). Hydra finds sweepers only in the `hydra_plugins` namespace; the
default of `python -m tokenreduce -m` (conf/hydra/sweeper/baseline.yaml)."""

from __future__ import annotations

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class BaselineSweeper(BasicSweeper):
    """BasicSweeper whose jobs are `tokenreduce.engine.sweeps.planned_jobs`; `baseline=false` leaves the
    added baselines out, which makes it Hydra's basic sweeper."""

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None, baseline: bool = True):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.baseline = baseline

    def split_arguments(self, overrides, max_batch_size):  # BasicSweeper.sweep calls it on the instance
        # tokenreduce only now: Hydra imports every plugin module whenever any Hydra application starts
        from tokenreduce.engine.sweeps import planned_jobs

        loader = self.hydra_context.config_loader
        jobs = planned_jobs(self.config, lambda job: loader.load_sweep_config(self.config, list(job)), announce=True)
        return list(self.split_overrides_to_chunks(jobs, max_batch_size))
