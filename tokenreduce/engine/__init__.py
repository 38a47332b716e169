"""Measurement and training loops around reduced models.

    run.py             one `python -m tokenreduce` run: build, evaluate or fine-tune, measure, record
    module.py          the LightningModule (metrics, AdamW + warm-up/cosine, mixup, reducer losses)
    losses.py          how a reducer's own loss terms join the objective
    speed.py           images/s from timed forward passes (GPU-synchronised, optional autocast)
    record.py          the result record written to result.json / result.csv
    collect.py         many records -> one table and accuracy-vs-images/s and -vs-MACs plots
    callbacks.py       Lightning callbacks (checkpoints, tokens and MACs per evaluation)
    hydra_callbacks.py run-directory guard and multirun collection
    loggers.py         CSV log and W&B (offline without an API key)
    config.py          where the Hydra config lives, composing it in-process, reducer specs, run names,
                       the settings each task does not read
    weights.py         a run's weights from a Lightning checkpoint, read safely and checked against the model
    console.py         standard output that outlives its reader (a pipe closed by Ctrl-C)
"""
