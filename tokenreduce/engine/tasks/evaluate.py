"""task=evaluate: the model as it is (pretrained, or the weights of `ckpt_path`), reduced by
`reducer`, on the evaluation split: top-1/top-5, loss, images/s, MACs and tokens per layer."""

from __future__ import annotations

from tokenreduce.engine.tasks import ONE_MODEL, TRAINING, Task, register_task
from tokenreduce.engine.tasks.lightning import ReducedModelSettings, run_reduced_model

TASK = register_task(Task(
    name="evaluate",
    check=lambda cfg, overrides: ReducedModelSettings.check(cfg, overrides, stage="validate"),
    run=lambda context, settings: run_reduced_model(context, "evaluate", settings),
    unused=(*TRAINING, *ONE_MODEL),
    baseline=True,
))
