"""Measurement and training loops around reduced models.

    run.py             one `python -m tokenreduce` run: the task looked up, checked, run (the dispatcher)
    tasks/             one module per task, registered by name (evaluate, finetune, compare, search, and
                       the transformers tasks); lightning.py and common.py hold what they share
    compare.py         task=compare's comparison at matched MACs; search.py task=search's schedule search
    hf_tasks.py        what the transformers tasks share: model and data checks, the loop, the metrics
    module.py          the LightningModule (metrics, AdamW + warm-up/cosine, mixup, reducer losses)
    losses.py          how a reducer's own loss terms join the objective
    speed.py           images/s from timed forward passes (GPU-synchronised, optional autocast)
    record.py          the result record written to result.json / result.csv
    collect.py         many records -> one table and accuracy-vs-images/s and -vs-MACs plots
    sweeps.py          a multirun's jobs: Hydra's grid, then the unreduced baseline it lacks (the sweeper
                       hydra_plugins.tokenreduce_sweeper runs them)
    callbacks.py       Lightning callbacks (checkpoints, tokens and MACs per evaluation)
    hydra_callbacks.py run-directory guard and lock, every multirun job checked first, multirun collection
    loggers.py         CSV log and W&B (offline without an API key; one group per multirun)
    config.py          where the Hydra config lives, the command line's translation (experiment=null,
                       reducer=<file>), composing it in-process, reducer specs, run names
    weights.py         a run's weights from a Lightning checkpoint, read safely and checked against the model
    console.py         what the run shows: progress (a bar, or dated lines off a terminal), output that
                       also goes into the run's log, and that outlives its reader (a pipe closed by Ctrl-C)
"""
