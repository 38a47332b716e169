"""Fine-tunes that lose nothing: `last.ckpt` always holds the latest step; a fine-tune stopped by
SIGINT or SIGTERM mid-epoch saves that step, records the interruption, prints the command that
resumes it, and the resumed run sees exactly the batches the interrupted one had left, ending with
the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SIGNALLING_PLUGIN
from torch.utils.data import Dataset

from tokenreduce.data.resumable import ResumableLoader
from tokenreduce.engine.config import compose
from tokenreduce.engine.record import RECORD_JSON, load_record
from tokenreduce.engine.run import resume_command, run
from tokenreduce.errors import ConfigError

# 16 training images in batches of 4: 4 steps an epoch, 3 epochs
FINETUNE = ["experiment=smoke_finetune", "trainer.enable_progress_bar=false", "data.train_samples=16",
            "data.val_samples=8", "data.batch_size=4", "data.num_classes=4", "measure.enabled=false",
            "trainer.max_epochs=3", "logger=csv"]
STEPS_PER_EPOCH, EPOCHS = 4, 3



pytestmark = pytest.mark.usefixtures("clean_hydra")


def tokenreduce_cli(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(tmp_path), "WANDB_MODE": "disabled", **env}
    return subprocess.run([sys.executable, "-m", "tokenreduce", *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)


def weights(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state["state_dict"], state["global_step"]


# mid-epoch (6 and 3) and at the last batch of an epoch (4)
@pytest.mark.parametrize("signal_name, at_step", [("SIGINT", 6), ("SIGTERM", 3), ("SIGINT", 4)])
def test_an_interrupted_finetune_resumes_exactly_where_it_stopped(tmp_path, signal_name, at_step):
    (tmp_path / "signalling.py").write_text(SIGNALLING_PLUGIN)
    args = [*FINETUNE, "imports=[signalling]", "reducer=tome", "reducer.name=test_signalling", "reducer.r=2"]
    whole = tokenreduce_cli(tmp_path, [*args, "hydra.run.dir=whole"], BATCH_LOG=str(tmp_path / "whole.log"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    stopped = tokenreduce_cli(tmp_path, [*args, "hydra.run.dir=stopped"], BATCH_LOG=str(tmp_path / "parts.log"),
                              SIGNAL=signal_name, SIGNAL_AT_STEP=str(at_step))
    assert stopped.returncode == 128 + getattr(__import__("signal"), signal_name), stopped.stderr[-3000:]
    record = load_record(tmp_path / "stopped" / RECORD_JSON)
    assert record.status == "interrupted" and signal_name in record.error
    assert record.global_step == at_step and record.top1 is None
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert record.last_checkpoint == str(last) and weights(last)[1] == at_step
    command = stopped.stdout.strip().splitlines()[-1].strip()
    assert command == record.resume_command and command.startswith("python -m tokenreduce ")
    assert f"ckpt_path={last.resolve()}" in command and "hydra.run.dir" not in command
    before = {p: p.read_bytes() for p in (tmp_path / "stopped").rglob("*") if p.is_file()}

    resumed = tokenreduce_cli(tmp_path, shlex.split(command)[3:], BATCH_LOG=str(tmp_path / "parts.log"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_dir = next((tmp_path / "outputs" / "runs").glob(f"*/*/{RECORD_JSON}")).parent
    record = load_record(resumed_dir / RECORD_JSON)
    assert record.status == "finished" and record.start_step == at_step
    assert record.global_step == STEPS_PER_EPOCH * EPOCHS

    # neither a repeated nor a skipped batch, and the same weights as the uninterrupted run
    assert (tmp_path / "parts.log").read_text().splitlines() == (tmp_path / "whole.log").read_text().splitlines()
    final, step = weights(resumed_dir / "checkpoints" / "last.ckpt")
    expected, expected_step = weights(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    assert step == expected_step == STEPS_PER_EPOCH * EPOCHS
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6, msg=name)
    assert {p: p.read_bytes() for p in (tmp_path / "stopped").rglob("*") if p.is_file()} == before


def test_last_checkpoint_holds_the_final_step_when_the_best_is_early(tmp_path):
    # monitoring the step with mode=min makes the first epoch the best for good
    cfg = compose([*FINETUNE, "checkpoint.monitor=step", "checkpoint.mode=min"])
    record = run(cfg, tmp_path / "run")
    assert record.global_step == STEPS_PER_EPOCH * EPOCHS
    assert weights(Path(record.last_checkpoint))[1] == STEPS_PER_EPOCH * EPOCHS
    assert weights(Path(record.best_checkpoint))[1] == STEPS_PER_EPOCH
    assert record.evaluated == f"checkpoint:{Path(record.best_checkpoint).resolve()}"


def test_a_resumed_finetune_keeps_the_best_checkpoint_from_before_the_interruption(tmp_path, monkeypatch):
    import lightning as L

    import tokenreduce.engine.tasks.lightning as engine
    from tokenreduce.engine.callbacks import LatestCheckpoint, RunInterrupted

    # the validation loss falls as the model learns, so with mode=max the first epoch stays the best;
    # the stop comes in the second
    args = [*FINETUNE, "checkpoint.monitor=val/loss", "checkpoint.mode=max"]
    whole = run(compose(args), tmp_path / "whole")

    class StopAtStep6(L.Callback):  # as if Ctrl-C came during step 6 (runs before the checkpoint callbacks)
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6:
                next(c for c in trainer.callbacks if isinstance(c, LatestCheckpoint)).received = "SIGINT"

    build_callbacks = engine.build_callbacks
    monkeypatch.setattr(engine, "build_callbacks", lambda *a, **k: [StopAtStep6(), *build_callbacks(*a, **k)])
    with pytest.raises(RunInterrupted):
        run(compose(args), tmp_path / "stopped")
    monkeypatch.undo()
    stopped = tmp_path / "stopped" / "checkpoints"
    assert sorted(p.name for p in stopped.iterdir()) == ["best-epoch000-step4.ckpt", "last.ckpt"]
    before = {p: p.read_bytes() for p in (tmp_path / "stopped").rglob("*") if p.is_file()}

    resumed = run(compose([*args, f"ckpt_path={stopped / 'last.ckpt'}"]), tmp_path / "resumed")
    best = Path(resumed.best_checkpoint)
    assert best == tmp_path / "resumed" / "checkpoints" / "best-epoch000-step4.ckpt"  # a copy in the new run
    assert resumed.evaluated == f"checkpoint:{best.resolve()}"
    assert Path(whole.best_checkpoint).name == best.name
    assert (resumed.loss, resumed.top1, resumed.top5) == pytest.approx((whole.loss, whole.top1, whole.top5), rel=1e-6)
    assert weights(best)[1] == 4
    for name, value in weights(Path(whole.best_checkpoint))[0].items():
        torch.testing.assert_close(weights(best)[0][name], value, rtol=0, atol=1e-6, msg=name)
    assert {p: p.read_bytes() for p in (tmp_path / "stopped").rglob("*") if p.is_file()} == before


def test_the_earlier_best_checkpoints_are_copied_with_their_scores(tmp_path):
    from tokenreduce.engine.callbacks import BestCheckpoints

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    scores = {"a.ckpt": 0.3, "b.ckpt": 0.1, "c.ckpt": 0.2, "d.ckpt": 0.05}
    for name in ("a.ckpt", "b.ckpt", "c.ckpt"):  # d.ckpt was deleted by hand
        (earlier / name).write_bytes(name.encode())
    before = {p: p.read_bytes() for p in earlier.iterdir()}
    state = {"dirpath": str(earlier), "best_model_path": str(earlier / "d.ckpt"),
             "best_model_score": torch.tensor(0.05),
             "best_k_models": {str(earlier / n): torch.tensor(v) for n, v in scores.items()}}
    best = BestCheckpoints(dirpath=str(tmp_path / "new"), monitor="val/loss", mode="min", save_top_k=2)
    with pytest.warns(UserWarning, match="d.ckpt of the run resumed from are gone"):
        best.load_state_dict(state)
    new = tmp_path / "new"
    # the best two of those left, by hand: b (0.1) then c (0.2)
    assert sorted(p.name for p in new.iterdir()) == ["b.ckpt", "c.ckpt"]
    assert (new / "b.ckpt").read_bytes() == b"b.ckpt" and (new / "c.ckpt").read_bytes() == b"c.ckpt"
    assert best.best_k_models == {str(new / "b.ckpt"): pytest.approx(0.1), str(new / "c.ckpt"): pytest.approx(0.2)}
    assert best.best_model_path == str(new / "b.ckpt") and float(best.best_model_score) == pytest.approx(0.1)
    assert best.kth_best_model_path == str(new / "c.ckpt") and float(best.kth_value) == pytest.approx(0.2)
    assert {p: p.read_bytes() for p in earlier.iterdir()} == before


def test_evaluating_a_checkpoint_records_those_weights(tmp_path):
    trained = run(compose([*FINETUNE, "trainer.max_epochs=1"]), tmp_path / "trained")
    evaluated = run(compose([*FINETUNE, "task=evaluate", f"ckpt_path={trained.best_checkpoint}"]), tmp_path / "eval")
    label = f"checkpoint:{Path(trained.best_checkpoint).resolve()}"
    assert evaluated.weights == label and evaluated.evaluated == label
    assert evaluated.top1 == pytest.approx(trained.top1)
    assert json.loads((tmp_path / "eval" / RECORD_JSON).read_text())["weights"] == label


def test_resume_command_keeps_the_settings_and_replaces_the_checkpoint(tmp_path):
    ckpt = tmp_path / "a b" / "last.ckpt"
    command = resume_command(["experiment=x", "reducer.r=4", "ckpt_path=/old.ckpt", "run_name=it's"], str(ckpt))
    assert shlex.split(command) == ["python", "-m", "tokenreduce", "experiment=x", "reducer.r=4", "run_name=it's",
                                    f"ckpt_path={ckpt}"]


class Numbers(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return torch.tensor(index), torch.rand(())  # the random value shows the sample's own seed


def batches(loader) -> list[tuple[list[int], list[float]]]:
    return [(idx.tolist(), noise.tolist()) for idx, noise in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_continues_the_epoch_with_the_same_batches_and_randomness(workers):
    loader = ResumableLoader(Numbers(22), batch_size=4, seed=7, num_workers=workers)
    loader.order.set_epoch(3)
    whole = batches(loader)
    assert len(whole) == 5 and sorted(i for idx, _ in whole for i in idx) != list(range(20))  # shuffled, 2 dropped
    torch.manual_seed(123)  # the training process's own randomness plays no part
    iterator = iter(loader)
    first = [next(iterator) for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 2}

    fresh = ResumableLoader(Numbers(22), batch_size=4, seed=7, num_workers=workers)
    fresh.load_state_dict(state)
    assert batches(first) + batches(fresh) == whole
    assert fresh.state_dict() == {"epoch": 3, "batches": 5}
    fresh.order.set_epoch(4)
    assert batches(fresh) != whole  # a new epoch, a new order

    # a state saved at the end of an epoch holds no position: the next epoch is whole
    ended = ResumableLoader(Numbers(22), batch_size=4, seed=7, num_workers=workers)
    ended.load_state_dict({"epoch": 3, "batches": 5})
    ended.order.set_epoch(4)
    assert len(batches(ended)) == 5


def test_resumable_loader_splits_an_epoch_across_ranks_without_overlap():
    ranks = [ResumableLoader(Numbers(16), batch_size=2, seed=0, num_replicas=2, rank=r) for r in range(2)]
    seen = [i for loader in ranks for idx, _ in loader for i in idx.tolist()]
    assert sorted(seen) == list(range(16))


EVALUATE = ["experiment=smoke", "trainer.enable_progress_bar=false", "data.train_samples=8", "data.val_samples=8",
            "data.batch_size=4", "measure.warmup=0", "measure.repeats=1", "logger=csv"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("setting", ["measure.device=cuda", "measure.device=cuda:3", "measure.device=tpu"])
def test_a_measuring_device_that_is_not_there_is_refused_before_any_compute(tmp_path, setting, monkeypatch):
    import tokenreduce.engine.tasks.lightning as engine

    monkeypatch.setattr(engine, "build_model", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(ConfigError, match=f"measure.device='{setting.split('=')[1]}'"):
        run(compose([*EVALUATE, setting]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_failure_after_the_evaluation_keeps_what_was_measured(tmp_path, monkeypatch):
    import tokenreduce.engine.tasks.lightning as engine

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "measure", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(compose(EVALUATE), tmp_path / "run")
    record = load_record(tmp_path / "run" / RECORD_JSON)
    assert record.status == "failed" and "out of memory" in record.error
    assert record.top1 is not None and record.gmacs is not None and record.images_per_s is None


def test_a_dtype_the_device_cannot_compute_is_refused_naming_the_setting(monkeypatch):
    from tokenreduce.engine import speed

    assert speed.check_measure(2, "bfloat16", None, "cpu", probe=True)[0] == torch.bfloat16

    def unsupported(*args, **kwargs):
        raise RuntimeError('"LayerNormKernelImpl" not implemented for \'Half\'\nmore')

    monkeypatch.setattr(speed.F, "layer_norm", unsupported)
    with pytest.raises(ConfigError, match=r"measure.dtype=float16 cannot run on cpu: .*LayerNormKernelImpl"):
        speed.check_measure(2, "float16", None, "cpu", probe=True)
    speed.check_measure(2, "float16", None, "cpu")  # without the probe: names and values only
