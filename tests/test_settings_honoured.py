"""Every setting a run is given is honoured, or refused by name before any compute: reducer files,
checkpoints under every task, settings a task does not read, every job of a multirun, the documented
`experiment=null`, and a console that loses its reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SIGNALLING_PLUGIN, cli
from hydra.core.global_hydra import GlobalHydra

from tokenreduce.engine.config import compose, reducer_spec
from tokenreduce.engine.record import RECORD_JSON, load_record
from tokenreduce.engine.run import run
from tokenreduce.errors import ConfigError

SMALL = ["experiment=smoke", "trainer.enable_progress_bar=false", "data.train_samples=16", "data.val_samples=12",
         "data.batch_size=4", "data.num_classes=4", "model.num_classes=4", "measure.warmup=0", "measure.repeats=2"]
FINETUNE = ["experiment=smoke_finetune", *SMALL[1:], "trainer.max_epochs=1", "measure.enabled=false"]
COMPARE = ["experiment=smoke", "task=compare", "reducer=none", "data.train_samples=16", "data.val_samples=12",
           "data.batch_size=4", "data.num_classes=4", "model.num_classes=4", "measure.warmup=0", "measure.repeats=1", "measure.batch_size=2",
           "compare.reducers=[tome]", "compare.mac_fractions=[0.75]", "compare.merge_maps=0"]


pytestmark = pytest.mark.usefixtures("clean_hydra", "no_wandb")


def reducer_file(folder: Path, spec: dict | str, name: str = "reducer.yaml") -> Path:
    path = folder / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """The best checkpoint of a one-epoch fine-tune of the smoke model (4 classes)."""
    GlobalHydra.instance().clear()
    folder = tmp_path_factory.mktemp("finetuned")
    record = run(compose(FINETUNE), folder / "run")
    GlobalHydra.instance().clear()
    return Path(record.best_checkpoint)


# --- a reducer file is the whole reducer, and configures nothing else ------------------------------
def test_a_reducer_file_wins_over_the_experiments_reducer_settings(tmp_path):
    schedule = [0, 4, 4, 0, 0, 0]
    path = reducer_file(tmp_path, {"name": "tome", "r": schedule})
    # smoke sets r=2 and tome_vit_b r=13 in their own bodies, merged after the reducer group
    for experiment in ("smoke", "tome_vit_b"):
        name, params = reducer_spec(compose([f"experiment={experiment}", f"reducer={path}"]).reducer)
        assert name == "tome" and params["r"] == schedule, experiment
    # the command line still has the last word
    assert reducer_spec(compose(["experiment=smoke", f"reducer={path}", "reducer.r=3"]).reducer)[1]["r"] == 3
    # another reducer's file takes none of the experiment's values: smoke's r=2 would clash with a ratio
    other = reducer_file(tmp_path, {"name": "pitome", "ratio": 0.9}, "pitome.yaml")
    name, params = reducer_spec(compose(["experiment=smoke", f"reducer={other}"]).reducer)
    assert name == "pitome" and params["ratio"] == 0.9 and params["r"] is None

    record = run(compose([*SMALL, "measure.enabled=false", f"reducer={path}"]), tmp_path / "run")
    assert record.reducer_params["r"] == schedule
    assert record.tokens_per_layer[:4] == [17, 17, 13, 9]  # 16 patches + class token; 4 merged in blocks 1, 2


@pytest.mark.parametrize("text, phrase", [
    ("# @package _global_\nname: tome\nr: 2\n", "a '# @package' line"),
    ("name: tome\nr: 2\nhydra:\n  callbacks: {}\n", "hydra is not a parameter of tome"),
    ("defaults:\n  - /model: vit_b16\nname: tome\n", "defaults is not a parameter of tome"),
    ("name: tome\nr: [1, 2\n", "not valid YAML (while parsing a flow sequence in {path}, line 2"),
    ("- tome\n", "list without a name"),
    ("name: tomme\n", "'tomme' is not registered"),
])
def test_a_reducer_file_that_sets_anything_else_or_is_broken_is_refused_naming_it(tmp_path, monkeypatch, capsys,
                                                                                   text, phrase):
    path = reducer_file(tmp_path, text, "mine.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli(monkeypatch, *SMALL, f"reducer={path}")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"reducer={path}" in err and phrase.format(path=path) in err, err
    assert "Traceback" not in err and not (tmp_path / "outputs").exists()


# --- every task honours every setting, or refuses it ------------------------------------------------
def test_compare_and_search_start_from_the_checkpoint_they_are_given(tmp_path, finetuned):
    evaluated = run(compose([*SMALL, "reducer=none", "measure.enabled=false",
                             f"ckpt_path={finetuned}"]), tmp_path / "evaluate")
    run(compose([*COMPARE, f"ckpt_path={finetuned}"]), tmp_path / "compare")
    result = json.loads((tmp_path / "compare" / "comparison.json").read_text())
    baseline = next(row for row in result["rows"] if row["reducer"] == "none")
    # the same 12 validation images through the same weights
    assert baseline["top1"] == pytest.approx(evaluated.top1)
    assert result["protocol"]["weights"] == f"checkpoint:{finetuned.resolve()}"
    # a random model would not score what the checkpoint scores: the weights were really loaded
    run(compose(COMPARE), tmp_path / "random")
    random_rows = json.loads((tmp_path / "random" / "comparison.json").read_text())["rows"]
    assert json.loads((tmp_path / "random" / "comparison.json").read_text())["protocol"]["weights"] == "random"
    assert random_rows[0]["top1"] != baseline["top1"]

    search = ["experiment=smoke", "task=search", "reducer=none", "data.train_samples=16",
              "data.val_samples=12", "data.batch_size=4", "data.num_classes=4", "model.num_classes=4",
              "budget.macs=0.7", "search.steps=1", "search.images=12", "search.batch_size=4", "search.test_images=12",
              "measure.warmup=0", "measure.repeats=1", "measure.batch_size=2", f"ckpt_path={finetuned}"]
    run(compose(search), tmp_path / "search")
    searched = json.loads((tmp_path / "search" / "search.json").read_text())
    assert searched["weights"] == f"checkpoint:{finetuned.resolve()}"
    unreduced = next(row for row in searched["held_out"]["rows"] if row["schedule"] == "unreduced")
    assert unreduced["top1"] == pytest.approx(evaluated.top1)  # the same 12 images through the same weights


@pytest.mark.parametrize("overrides, phrase", [
    ([*COMPARE, "reducer=tome"], "reducer=tome is not used by task=compare"),
    ([*COMPARE, "trainer.max_epochs=3"], "trainer.max_epochs=3 is not used by task=compare"),
    ([*COMPARE, "optim.lr=0.1"], "optim.lr=0.1 is not used by task=compare"),
    (["experiment=smoke", "task=search", "reducer=pitome"], "reducer=pitome is not used by task=search"),
    ([*SMALL, "compare.images=3"], "compare.images=3 is not used by task=evaluate"),
    ([*SMALL, "optim.lr=0.1"], "optim.lr=0.1 is not used by task=evaluate"),
    ([*SMALL, "~optim.lr"], "optim.lr is not used by task=evaluate"),
    ([*SMALL, "reducer@text_reducer=tome"], "text_reducer=tome is not used by task=evaluate"),
    (["experiment=text_sst2", "ckpt_path=/x.ckpt"], "ckpt_path=/x.ckpt is not used by task=text_classification"),
])
def test_a_setting_the_task_does_not_read_is_refused_by_name(tmp_path, overrides, phrase):
    with pytest.raises(ConfigError, match=phrase.replace(".", r"\.")):
        run(compose(overrides), tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run").exists()


def test_a_truncated_or_foreign_checkpoint_is_refused_before_any_compute(tmp_path, finetuned):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(finetuned.read_bytes()[: finetuned.stat().st_size // 2])
    plain_tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), plain_tensor)
    cases = {
        str(truncated): "cannot be read as a checkpoint",
        str(plain_tensor): "not a Lightning checkpoint",
    }
    for path, phrase in cases.items():
        for overrides in (SMALL, COMPARE, FINETUNE):
            with pytest.raises(ConfigError, match=f"ckpt_path={path}: {phrase}"):
                run(compose([*overrides, f"ckpt_path={path}"]), tmp_path / "run")
            assert not (tmp_path / "run").exists()
    # a checkpoint of another model: 10 classes against the checkpoint's 4
    for overrides in (SMALL, COMPARE, FINETUNE):
        with pytest.raises(ConfigError, match=r"does not fit model test_vit: weights 2 of another shape "
                                              r"\(e\.g\. (model\.)?head\.bias: \(4,\) in the file, \(10,\)"):
            run(compose([*overrides, "model.num_classes=10", f"ckpt_path={finetuned}"]), tmp_path / "run")
        assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.ckpt"))


# --- refused before compute, not after ----------------------------------------------------------------
@pytest.mark.parametrize("override, phrase", [
    ("checkpoint.monitor=val/top2", "checkpoint.monitor='val/top2' is not a metric the fine-tune logs"),
    ("checkpoint.monitor=val/top5", "checkpoint.monitor='val/top5' is not a metric"),  # 4 classes: no top5
    ("checkpoint.monitor=val/loss", None),  # logged: runs
    ("checkpoint.mode=best", "checkpoint.mode='best' is invalid; allowed: min, max"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1 is invalid for task=finetune"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is invalid"),
])
def test_finetune_settings_that_would_fail_after_an_epoch_are_refused_first(tmp_path, override, phrase):
    if phrase is None:
        assert run(compose([*FINETUNE, override]), tmp_path / "run").status == "finished"
        return
    with pytest.raises(ConfigError, match=phrase.replace("[", r"\[").replace(".", r"\.")):
        run(compose([*FINETUNE, override]), tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.parametrize("override, phrase", [
    ("data.batch_size=0", "data.batch_size=0 is invalid"),  # not measure.batch_size, which follows it
    ("data.num_classes=0", "data.num_classes=0 is invalid"),  # raised inside the data module
    ("reducer.ratio=1.5", "ratio=1.5 is invalid; allowed: a keep ratio in (0, 1]"),  # smoke sets r too
])
def test_a_bad_value_is_named_as_itself(tmp_path, override, phrase):
    with pytest.raises(ConfigError) as info:
        run(compose([*SMALL, override]), tmp_path / "run")
    assert phrase in str(info.value) and "Error in call to target" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_every_job_of_a_multirun_is_checked_before_the_first_computes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli(monkeypatch, "-m", *SMALL, "reducer.r=2,-1,3", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "job 1 (" in err and "reducer.r=-1" in err and "r=-1 is invalid" in err
    assert "no job has run" in err and not list(tmp_path.rglob(RECORD_JSON))


def test_experiment_null_leaves_the_bare_root_as_documented(tmp_path, monkeypatch):
    cfg = compose(["experiment=null"])
    assert cfg.task == "evaluate" and cfg.model.name == "test_vit" and cfg.data._target_.endswith("SyntheticDataModule")
    monkeypatch.chdir(tmp_path)
    cli(monkeypatch, "experiment=null", "data.train_samples=8", "data.val_samples=8", "measure.enabled=false",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}")
    record = load_record(tmp_path / "run" / RECORD_JSON)
    assert record.model == "test_vit" and record.reducer == "none" and record.status == "finished"


# --- a console that loses its reader ---------------------------------------------------------------


def test_ctrl_c_with_the_output_piped_still_writes_the_record_and_the_resume_command(tmp_path):
    """As with `... | tee log`: Ctrl-C ends the reader too, and every later write to stdout fails."""
    (tmp_path / "signalling.py").write_text(SIGNALLING_PLUGIN)
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "WANDB_MODE": "disabled", "MARKER": str(marker),
           "SIGNAL": "SIGINT", "SIGNAL_AT_STEP": "3"}
    args = [*FINETUNE, "trainer.enable_progress_bar=true", "trainer.max_epochs=3", "imports=[signalling]",
            "reducer.name=test_signalling", f"hydra.run.dir={tmp_path / 'run'}"]
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "tokenreduce", *args], cwd=tmp_path, env=env,
                                   stdout=subprocess.PIPE, stderr=stderr)
        deadline = time.monotonic() + 240
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.stdout.close()  # the reader has gone
        code = process.wait(timeout=240)
    err = (tmp_path / "stderr").read_text()
    assert code == 130, err[-3000:]
    record = load_record(tmp_path / "run" / RECORD_JSON)
    assert record.status == "interrupted" and record.global_step == 3
    assert record.resume_command and f"ckpt_path={(tmp_path / 'run' / 'checkpoints' / 'last.ckpt').resolve()}" in (
        record.resume_command)
    assert record.resume_command in err  # said where it can still be read


def test_an_unreadable_image_names_its_file_and_leaves_a_failed_record(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "data" / "val" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / "data" / "val" / label / f"{i}.jpg")
    broken = tmp_path / "data" / "val" / "a" / "0.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    overrides = ["experiment=smoke", "data=image_folder", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                 "model.num_classes=2", "measure.enabled=false", "trainer.enable_progress_bar=false"]
    with pytest.raises(ConfigError, match=f"the image {broken} cannot be read"):
        run(compose(overrides), tmp_path / "run")
    record = load_record(tmp_path / "run" / RECORD_JSON)
    assert record.status == "failed" and str(broken) in record.error and record.top1 is None
