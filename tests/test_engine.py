"""The experiment engine end to end on a CPU: evaluation, fine-tuning, resume, W&B offline, reducer
losses, multirun plus collector, and bad input failing cleanly without touching earlier runs."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import cli
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from torch import nn

import tokenreduce
from tokenreduce.data import SyntheticImages
from tokenreduce.engine.config import build_reducer, compose
from tokenreduce.engine.losses import LossContext, check_weight_names, reducer_loss_terms, weigh
from tokenreduce.engine.metrics import topk_accuracy
from tokenreduce.engine.module import ReductionModule, warmup_cosine
from tokenreduce.engine.record import RECORD_JSON, RunRecord, ensure_fresh, load_record
from tokenreduce.engine.run import build_model, run
from tokenreduce.engine.speed import measure
from tokenreduce.errors import ConfigError
from tokenreduce.reducers import base as registry
from tokenreduce.reducers.tome import ToMe

# the smoke experiment made smaller still: 16 training and 12 validation images of 64x64, batches of 4
SMALL = ["experiment=smoke", "trainer.enable_progress_bar=false", "data.train_samples=16", "data.val_samples=12",
         "data.batch_size=4", "measure.warmup=0", "measure.repeats=2"]
FINETUNE = ["experiment=smoke_finetune", *SMALL[1:], "trainer.log_every_n_steps=1", "data.num_classes=4"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def config(*overrides: str, base=SMALL):
    return compose([*base, *overrides])


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- off-the-shelf evaluation ----------------------------------------------------------------
def test_evaluate_writes_a_record_that_matches_a_plain_loop(tmp_path):
    cfg = config()
    record = run(cfg, tmp_path / "run")
    # the record on disk, as JSON and as a one-row CSV
    assert json.loads((tmp_path / "run" / RECORD_JSON).read_text()) == record.to_dict()
    row = read_csv(tmp_path / "run" / "result.csv")[0]
    assert float(row["top1"]) == pytest.approx(record.top1) and row["reducer"] == "tome"
    # the same model and images, scored with a plain loop
    L.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg.model).eval()
    tokenreduce.apply(model, "tome", r=2)
    images = SyntheticImages(12, 10, (3, 64, 64), seed=0, first_index=16)
    hits1 = hits5 = 0
    with torch.no_grad():
        for i in range(len(images)):
            image, label = images[i]
            logits = model(image[None])[0]
            hits1 += int(logits.argmax()) == label
            hits5 += label in logits.topk(5).indices.tolist()
    assert record.top1 == pytest.approx(hits1 / 12)
    assert record.top5 == pytest.approx(hits5 / 12)
    # protocol and Core statistics: 16 patches + CLS, ToMe removes 2 per layer over 6 blocks
    assert record.tokens_per_layer == [17, 15, 13, 11, 9, 7, 5] and record.tokens_out == 5
    assert record.gmacs == pytest.approx(tokenreduce.stats(model)["macs"] / 1e9)
    assert record.images_per_s > 0 and record.measure["batch_size"] == 4 and record.measure["dtype"] == "float32"
    assert len(record.measure["seconds_per_batch"]) == 2
    assert record.reducer_params["r"] == 2 and record.weights == "random" and record.task == "evaluate"
    assert record.run_name == "test_vit-tome-r=2"
    # the same numbers reach the logger
    logged = read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    val = [r for r in logged if r.get("val/top1")]
    assert float(val[-1]["val/top1"]) == pytest.approx(record.top1)
    final = [r for r in logged if r.get("result/images_per_s")]
    assert float(final[-1]["result/images_per_s"]) == pytest.approx(record.images_per_s)


def test_baseline_and_test_split(tmp_path):
    record = run(config("reducer=none", "eval_split=test", "measure.enabled=false"), tmp_path / "run")
    assert record.reducer == "none" and record.split == "test"
    assert record.tokens_per_layer == [17] * 7 and record.images_per_s is None and record.top1 is not None


# --- fine-tuning, checkpoints, resume -----------------------------------------------------------
def test_finetune_learns_checkpoints_and_resumes_from_the_saved_step(tmp_path):
    first = run(config("trainer.max_epochs=1", base=FINETUNE), tmp_path / "first")
    steps_per_epoch = 16 // 4
    assert first.global_step == steps_per_epoch and first.start_step == 0
    ckpts = tmp_path / "first" / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and Path(first.best_checkpoint).is_file()
    assert first.last_checkpoint == str(ckpts / "last.ckpt")

    second = run(config("trainer.max_epochs=3", f"ckpt_path={ckpts / 'last.ckpt'}", base=FINETUNE),
                 tmp_path / "second")
    assert second.start_step == steps_per_epoch and second.global_step == 3 * steps_per_epoch
    assert second.resumed_from == str(ckpts / "last.ckpt")
    logged = read_csv(tmp_path / "second" / "csv" / "metrics.csv")
    train_steps = [int(r["step"]) for r in logged if r.get("train/loss")]
    assert train_steps and min(train_steps) >= steps_per_epoch  # continued, not restarted
    assert second.top1 >= 0.75  # the 4 classes of the synthetic set are learnable; chance is 0.25

    # warm-up then cosine, as logged per step (lr of the parameter groups)
    lr_rows = [r for r in logged if r.get("lr-AdamW/pg1")]
    total = 3 * steps_per_epoch
    for r in lr_rows:
        expected = warmup_cosine(int(r["step"]), total, 2, 1e-3, 1e-6, 1e-6)
        assert float(r["lr-AdamW/pg1"]) == pytest.approx(expected, rel=1e-5)

    # evaluating the best checkpoint gives the fine-tune's own final numbers
    again = run(config(f"ckpt_path={second.best_checkpoint}", "data.num_classes=4"), tmp_path / "again")
    assert again.top1 == pytest.approx(second.top1) and again.loss == pytest.approx(second.loss, rel=1e-5)


def test_warmup_cosine_by_hand():
    values = [warmup_cosine(s, 6, 2, 1.0, 0.0, 0.0) for s in range(7)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                    0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])
    assert warmup_cosine(10, 6, 2, 1.0, 0.0, 0.1) == pytest.approx(0.1)  # stays at min_lr past the end
    assert warmup_cosine(0, 10, 0, 2.0, 0.0, 0.0) == pytest.approx(2.0)


# --- W&B ------------------------------------------------------------------------------------------
def test_wandb_runs_offline_without_a_key_and_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    record = run(config("logger=default", "logger.wandb.project=tokenreduce-test"), tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the run's data, ready for `wandb sync`
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()  # the CSV log beside it
    assert record.top1 is not None


# --- reducer losses join the objective --------------------------------------------------------
@pytest.fixture
def lossy_reducer():
    """A ToMe that reports one loss term from inside the pass and one from a second pass."""

    @registry.register_reducer("test_lossy")
    class LossyToMe(ToMe):
        def __init__(self, r: int = 1, scale: float = 1.0):
            super().__init__(r=r)
            self.scale = nn.Parameter(torch.tensor(float(scale)))

        def reduce(self, x, signals, state, layer, removal):
            state.extras.setdefault("losses", {})["in_pass"] = (self.scale - 3.0) ** 2
            return super().reduce(x, signals, state, layer, removal)

        def training_losses(self, context: LossContext):
            assert context.state is not None and "in_pass" in context.state.extras["losses"]
            return {"second_pass": context.criterion(context.model(context.images), context.targets)}

    yield "test_lossy"
    registry._REGISTRY.pop("test_lossy")


def with_reducer(cfg, **spec):
    with open_dict(cfg):
        cfg.reducer = spec
    return cfg


def test_reducer_losses_join_the_objective_with_their_weights(tmp_path, lossy_reducer):
    cfg = config("+loss.reducer_weights.in_pass=2.0", "+loss.reducer_weights.second_pass=0.5",
                 "trainer.max_epochs=1", base=FINETUNE)
    record = run(with_reducer(cfg, name=lossy_reducer, r=1), tmp_path / "run")
    logged = [r for r in read_csv(tmp_path / "run" / "csv" / "metrics.csv") if r.get("train/loss")]
    assert len(logged) == 4
    for r in logged:
        total = float(r["train/loss_main"]) + float(r["train/loss_in_pass"]) + float(r["train/loss_second_pass"])
        assert float(r["train/loss"]) == pytest.approx(total, rel=1e-5)
    # the logged terms are weighted: the first step's in-pass term is 2 * (1 - 3)^2
    assert float(logged[0]["train/loss_in_pass"]) == pytest.approx(8.0, rel=1e-5)
    # its gradient reached the reducer's own parameter, which moved towards 3
    state = torch.load(record.last_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.token_reducer.scale"].item() > 1.0


def test_reducer_losses_can_be_switched_off_and_misspelt_weights_fail(tmp_path, lossy_reducer):
    cfg = config("loss.reducer_losses=false", "trainer.max_epochs=1", base=FINETUNE)
    run(with_reducer(cfg, name=lossy_reducer), tmp_path / "off")
    logged = [r for r in read_csv(tmp_path / "off" / "csv" / "metrics.csv") if r.get("train/loss")]
    assert all(float(r["train/loss"]) == pytest.approx(float(r["train/loss_main"])) for r in logged)
    assert "train/loss_in_pass" not in logged[0]
    cfg = config("+loss.reducer_weights.consistancy=3.0", "trainer.max_epochs=1", base=FINETUNE)
    with pytest.raises(ConfigError, match="consistancy.*reported terms: in_pass, second_pass"):
        run(with_reducer(cfg, name=lossy_reducer), tmp_path / "typo")


def test_loss_terms_weighting_and_checks(lossy_reducer):
    model = build_model({"name": "test_vit", "img_size": 32, "num_classes": 4})
    tokenreduce.apply(model, lossy_reducer, r=1, scale=2.0)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    tokens = model.forward_features(images)
    logits = model.forward_head(tokens)
    criterion = nn.CrossEntropyLoss()
    context = LossContext(model, images, tokens, labels, labels, logits, criterion, model._tokenreduce.last_state)
    terms = reducer_loss_terms(context)
    assert set(terms) == {"in_pass", "second_pass"}
    assert terms["in_pass"].item() == pytest.approx(1.0)
    assert terms["second_pass"].item() == pytest.approx(criterion(logits, labels).item(), rel=1e-5)
    weighted = weigh(terms, {"in_pass": 0.0, "second_pass": 4.0})
    assert set(weighted) == {"second_pass"} and weighted["second_pass"].item() == pytest.approx(
        4 * terms["second_pass"].item())
    check_weight_names({"in_pass": 1.0}, set(terms), "test_lossy")
    with pytest.raises(ConfigError, match="ratio"):
        check_weight_names({"ratio": 1.0}, set(terms), "test_lossy")
    # a plain reducer reports nothing
    plain = build_model({"name": "test_vit", "img_size": 32, "num_classes": 4})
    tokenreduce.apply(plain, "tome", r=1)
    tokens = plain.forward_features(images)
    assert reducer_loss_terms(LossContext(plain, images, tokens, labels, labels, plain.forward_head(tokens),
                                          criterion, plain._tokenreduce.last_state)) == {}


def test_imports_register_a_reducer_from_outside_the_package(tmp_path, monkeypatch):
    (tmp_path / "my_reducers.py").write_text(
        "from tokenreduce import register_reducer\n"
        "from tokenreduce.reducers.tome import ToMe\n\n"
        "@register_reducer('test_plugin')\n"
        "class Plugin(ToMe):\n"
        "    def __init__(self, r: int = 1):\n"
        "        super().__init__(r=r)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = with_reducer(config("imports=[my_reducers]", "measure.enabled=false"), name="test_plugin", r=3)
        record = run(cfg, tmp_path / "run")
        assert record.reducer == "test_plugin" and record.tokens_per_layer[:2] == [17, 14]
    finally:
        registry._REGISTRY.pop("test_plugin", None)
        sys.modules.pop("my_reducers", None)
    with pytest.raises(ConfigError, match="imports: cannot import 'no_such_module'"):
        run(config("imports=[no_such_module]"), tmp_path / "bad")


# --- multirun and the collector ----------------------------------------------------------------
def test_multirun_over_two_settings_writes_two_records_and_the_collection(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    cli(monkeypatch, "-m", *SMALL, "reducer.r=1,3", f"hydra.sweep.dir={sweep}")
    records = [load_record(sweep / str(n) / RECORD_JSON) for n in range(3)]  # the grid, then its baseline
    assert [(r.reducer, r.reducer_params.get("r")) for r in records] == [("tome", 1), ("tome", 3), ("none", None)]
    assert records[2].tokens_out > records[0].tokens_out > records[1].tokens_out
    table = read_csv(sweep / "results.csv")
    assert [row["params"] for row in table] == ["", "r=1", "r=3"]
    assert "| tome | r=3 |" in (sweep / "results.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # the table without plots; the plots are tested in test_collect.py where matplotlib is
    for name in ("accuracy_vs_throughput.png", "accuracy_vs_macs.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad input -----------------------------------------------------------------------------------
def test_bad_input_fails_clearly_and_leaves_earlier_runs_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli(monkeypatch, *SMALL)
    earlier = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(earlier) == 1 and (earlier[0] / RECORD_JSON).is_file()
    before = snapshot(tmp_path / "outputs")
    capsys.readouterr()

    bad = {
        "missing dataset": (["data=imagenet", f"data.root={tmp_path / 'nowhere'}"], ["data.root", "nowhere"]),
        "unset dataset": (["data=imagenet", "data.root=null"], ["data.root is not set"]),
        "unknown parameter": (["+reducer.rr=3"], ["unknown parameter(s) rr", "allowed: r, inflect"]),
        "impossible schedule": (["reducer.layers=[2,40]"], ["layers=[2, 40]", "6 blocks"]),
        "negative r": (["reducer.r=-1"], ["r=-1", "integer >= 0"]),
    }
    for label, (overrides, phrases) in bad.items():
        base = SMALL if not overrides[0].startswith("data=") else SMALL[:2]  # imagenet has no sample counts
        with pytest.raises(SystemExit) as exit_info:
            cli(monkeypatch, *base, *overrides)
        assert exit_info.value.code == 2, label
        err = capsys.readouterr().err
        assert "tokenreduce: error:" in err and "Traceback" not in err, label
        for phrase in phrases:
            assert phrase in err, (label, phrase, err)

    # pointing Hydra at the earlier run's directory: refused before Hydra writes its files there
    with pytest.raises(SystemExit) as exit_info:
        cli(monkeypatch, *SMALL, f"hydra.run.dir={earlier[0]}")
    assert exit_info.value.code == 2 and "already holds result.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli(monkeypatch, "-m", *SMALL, "reducer.r=1,2", f"hydra.sweep.dir={tmp_path / 'outputs'}")
    assert exit_info.value.code == 2 and "sweep directory" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        cli(monkeypatch, "experiment=no_such_experiment")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "no_such_experiment" in err and "tome_vit_b" in err  # names the available experiments

    # a run refused before any compute leaves no run directory (single runs and multirun jobs) ...
    assert sorted((tmp_path / "outputs" / "runs").glob("*/*")) == earlier
    with pytest.raises(SystemExit):
        cli(monkeypatch, "-m", *SMALL, "reducer.r=-1,-2")
    assert not list((tmp_path / "outputs" / "sweeps").glob("*/*/[0-9]*"))
    # ... but a folder the user made keeps what was in it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        cli(monkeypatch, *SMALL, "reducer.r=-1", f"hydra.run.dir={mine}")
    assert (mine / "notes.txt").read_text() == "keep"

    after = snapshot(tmp_path / "outputs")
    assert {k: after.get(k) for k in before} == before  # the earlier run: every file as it was
    # no failed run left a result or a checkpoint anywhere
    assert len(list((tmp_path / "outputs").rglob(RECORD_JSON))) == 1
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))


def test_empty_dataset_folder_names_the_path_and_key(tmp_path):
    (tmp_path / "data" / "val").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"data.root=.*has no class folders"):
        run(config("data=imagenet", f"data.root={tmp_path / 'data'}", base=SMALL[:2]), tmp_path / "run")
    (tmp_path / "data" / "val" / "cat").mkdir()
    (tmp_path / "data" / "val" / "dog").mkdir()
    with pytest.raises(ConfigError, match=r"hold no images"):
        run(config("data=imagenet", f"data.root={tmp_path / 'data'}", base=SMALL[:2]), tmp_path / "run2")


def test_a_run_directory_with_results_is_never_reused(tmp_path):
    record = run(config("measure.enabled=false"), tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds result.json"):
        run(config("measure.enabled=false"), tmp_path / "run")
    with pytest.raises(ConfigError, match="never overwrites"):
        record.write(tmp_path / "run")
    assert snapshot(tmp_path / "run") == before
    with pytest.raises(ConfigError, match="already holds"):
        ensure_fresh(tmp_path / "run")
    ensure_fresh(tmp_path / "elsewhere")


def test_other_bad_settings_fail_before_any_compute(tmp_path):
    checks = {
        "task=train": "task='train'",
        "eval_split=holdout": "eval_split='holdout'",
        "measure.dtype=float8": "measure.dtype='float8'",
        "measure.batch_size=0": "measure.batch_size=0",
        "optim.lr=-1": "optim.lr=-1",
        "loss.mixup_mode=row": "loss.mixup_mode='row'",
        f"ckpt_path={tmp_path / 'none.ckpt'}": "no such checkpoint",
        "+optim.momentum=0.9": "optim.momentum",
    }
    for override, phrase in checks.items():
        with pytest.raises(ConfigError, match=phrase.replace("[", r"\[").replace(".", r"\.")):
            run(config(override), tmp_path / "run")
        assert not (tmp_path / "run").exists(), override


# --- the pieces ----------------------------------------------------------------------------------
def test_topk_accuracy_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=generator)
    labels = torch.randint(7, (50,), generator=generator)
    metrics = topk_accuracy(7)
    metrics.update(logits[:20], labels[:20])
    metrics.update(logits[20:], labels[20:])
    result = metrics.compute()
    top1 = sum(int(logits[i].argmax()) == int(labels[i]) for i in range(50)) / 50
    top5 = sum(int(labels[i]) in logits[i].topk(5).indices.tolist() for i in range(50)) / 50
    assert result["top1"].item() == pytest.approx(top1) and result["top5"].item() == pytest.approx(top5)
    assert set(topk_accuracy(3).keys()) == {"top1"}


def test_topk_accuracy_needs_two_classes_and_top5_more_than_five():
    assert set(topk_accuracy(5).keys()) == {"top1"}  # every label is in the top 5 of 5: always 1.0
    assert set(topk_accuracy(6).keys()) == {"top1", "top5"}
    for bad in (1, 0):  # 0: a feature extractor without a head
        with pytest.raises(ConfigError, match=f"^model.num_classes={bad} is invalid; allowed: an integer >= 2"):
            topk_accuracy(bad)


def test_measure_keeps_the_model_and_records_the_protocol():
    model = build_model({"name": "test_vit", "img_size": 32, "num_classes": 4})
    tokenreduce.apply(model, "tome", r=1)
    before = model.blocks[0].attn.qkv.weight.clone()
    timing = measure(model, (3, 32, 32), batch_size=3, dtype="bfloat16", device="cpu", warmup=0, repeats=2)
    assert timing.dtype == "bfloat16" and timing.batch_size == 3 and len(timing.seconds_per_batch) == 2
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)
    assert timing.images_per_s == pytest.approx(3 / sorted(timing.seconds_per_batch)[1])
    mixed = measure(model, (3, 32, 32), batch_size=2, autocast="bfloat16", device="cpu", warmup=1, repeats=1)
    assert mixed.autocast == "bfloat16" and mixed.dtype == "float32"
    for kwargs, phrase in (({"dtype": "half"}, "measure.dtype"), ({"autocast": "int8"}, "measure.autocast"),
                           ({"batch_size": 0}, "measure.batch_size"), ({"device": "tpu:x"}, "measure.device")):
        with pytest.raises(ConfigError, match=phrase):
            measure(model, (3, 32, 32), **{"batch_size": 1, **kwargs})


def test_mixup_training_step_uses_soft_targets():
    model = build_model({"name": "test_vit", "img_size": 32, "num_classes": 4})
    tokenreduce.apply(model, "none")
    from tokenreduce.engine.module import LossSettings

    module = ReductionModule(model, 4, loss=LossSettings(mixup=0.8, cutmix=1.0, label_smoothing=0.1))
    assert module.mixup is not None
    images, targets = module.mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(1), torch.ones(4))
    assert module.train_criterion(model(images), targets).ndim == 0
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        LossSettings(label_smoothing=1.5)


def test_record_roundtrip_and_table(tmp_path):
    record = RunRecord(run_name="r", task="evaluate", model="m", weights="random", dataset={"name": "d"},
                       split="val", reducer="tome", reducer_params={"r": 4}, top1=0.5, images_per_s=123.4,
                       tokens_per_layer=[5, 3])
    record.write(tmp_path)
    assert load_record(tmp_path / RECORD_JSON) == record
    assert read_csv(tmp_path / "result.csv")[0]["tokens_per_layer"] == "5 3"
    lines = dict(line.split(None, 1) for line in record.table().splitlines() if len(line.split(None, 1)) == 2)
    assert lines["images/s"] == "123.4" and lines["reducer"] == "tome r=4" and lines["tokens/layer"] == "5 3"
    assert "measured" not in lines
    assert record.metrics() == {"top1": 0.5, "images_per_s": 123.4}


def test_build_reducer_from_a_config_node():
    reducer = build_reducer(compose(["reducer=tome", "reducer.r=5"]).reducer)
    assert reducer.params()["r"] == 5


@pytest.mark.parametrize("reducer, terms", [
    ({"name": "mctf", "r": 2, "mode": 1}, {"ce_teacher", "consistency"}),
    ({"name": "dynamicvit", "ratios": [0.7], "layers": [2]}, {"ratio"}),
])
def test_registered_reducers_losses_reach_the_objective(tmp_path, reducer, terms):
    cfg = config("trainer.max_epochs=1", base=FINETUNE)
    run(with_reducer(cfg, **reducer), tmp_path / "run")
    logged = [r for r in read_csv(tmp_path / "run" / "csv" / "metrics.csv") if r.get("train/loss")]
    assert logged
    for r in logged:
        parts = [float(r["train/loss_main"])] + [float(r[f"train/loss_{t}"]) for t in terms]
        assert float(r["train/loss"]) == pytest.approx(sum(parts), rel=1e-5)
        assert all(math.isfinite(p) for p in parts)


def test_model_adapter_options_reach_the_model_and_the_record(tmp_path):
    """`model.adapter_options` (here where an EVA-02's merged tokens take their RoPE position) is
    applied with the reducer, named in the record, and checked before any run directory content."""
    eva = ["model.name=eva02_tiny_patch14_224", "model.img_size=56", "+model.kwargs.depth=2"]
    record = run(config(*eva, "model.adapter_options={merged_position: mean}"), tmp_path / "run")
    assert record.adapter_options == {"merged_position": "mean"} and record.tokens_out < record.tokens_per_layer[0]
    default = run(config(*eva), tmp_path / "default")
    assert default.adapter_options == {}  # defaults are not named
    with pytest.raises(ConfigError, match="merged_position='centre' is invalid; allowed: 'destination', 'mean'"):
        run(config(*eva, "model.adapter_options={merged_position: centre}"), tmp_path / "bad")
    assert not (tmp_path / "bad" / RECORD_JSON).exists()
