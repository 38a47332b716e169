"""Data-parallel fine-tuning through Lightning: two CPU processes talking over gloo."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenreduce.engine.record import load_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp_fit_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "tokenreduce", "experiment=smoke_finetune", "trainer=ddp_cpu",
               "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "data.train_samples=16",
               "data.val_samples=8", "data.batch_size=4", "measure.repeats=2", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = load_record(run_dir / "result.json")
    # each process sees half of the 16 images: 2 steps of 4 per epoch
    assert record.global_step == 2 * 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["val/top1"] for r in rows if r.get("val/top1")]
    # one record, written by rank 0 only
    assert len(list(tmp_path.rglob("result.json"))) == 1
