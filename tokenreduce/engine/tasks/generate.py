"""task=generate: samples of a diffusion model, unreduced and with each of `generate.reducers`, side by
side: speed, memory, fidelity and (on the project's model) class accuracy and a Fréchet distance
(engine/generation.py)."""

from __future__ import annotations

from tokenreduce.engine.generation import check_generate, run_generate
from tokenreduce.engine.tasks import ONE_MODEL, TRAINING, RunContext, Task, register_task


def check(cfg, overrides):
    return check_generate(cfg)


def run(context: RunContext, settings) -> None:
    run_generate(context.cfg, settings, context.output_dir)


TASK = register_task(Task(
    name="generate", check=check, run=run,
    unused=("model", "reducer", "text_reducer", "data", "trainer", "logger", "run_name", "eval_split", *TRAINING,
            *ONE_MODEL),
    reads="generate.* (pipeline, conditions, samples, sampler, reducers), diffusion.model with ckpt_path, and "
          "measure.device",
))
