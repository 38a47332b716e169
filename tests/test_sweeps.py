"""Sweeps: every multirun measures its unreduced baseline in the same protocol (added by the sweeper,
once per group of jobs that differ only in the reducer), its jobs share one W&B group, and the
collected table gives each run's speed-up and MAC fraction against that baseline. Experiments choose
a reducer preset, so another reducer on the command line starts from its own defaults."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from conftest import cli
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

import tokenreduce
from tokenreduce.engine import loggers
from tokenreduce.engine.collect import TABLE_CSV, TABLE_MD
from tokenreduce.engine.config import build_reducer, compose, reducer_spec
from tokenreduce.engine.record import RECORD_JSON, load_record
from tokenreduce.engine.sweeps import SWEEPER, baselines, grid, planned_jobs, reducer_override
from tokenreduce.errors import ConfigError

SMALL = ["experiment=smoke", "trainer.enable_progress_bar=false", "data.train_samples=8", "data.val_samples=8",
         "data.batch_size=4", "measure.warmup=0", "measure.repeats=2"]


pytestmark = pytest.mark.usefixtures("clean_hydra", "no_wandb")


def composed(job: list[str]):
    GlobalHydra.instance().clear()
    return compose(job)


class RecordingWandb(CSVLogger):
    """Stands in for WandbLogger (no wandb process, no network): a CSV logger that keeps the arguments
    W&B would have been started with."""

    built: list[dict] = []

    def __init__(self, save_dir: str, offline: bool, **options):
        RecordingWandb.built.append({"offline": offline, **options})
        super().__init__(save_dir=save_dir, name="wandb_stand_in", version="")

    @property
    def experiment(self):
        writer = super().experiment
        writer.finish = lambda: None  # finish_loggers ends a W&B run
        return writer


# --- a sweep has its baseline, and the table its ratios --------------------------------------------
def test_a_sweep_measures_its_baseline_and_the_table_compares_against_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loggers, "WandbLogger", RecordingWandb)
    RecordingWandb.built = []
    sweep = tmp_path / "sweep"
    cli(monkeypatch, "-m", *SMALL, "reducer.r=1,2", "logger=default", "logger.wandb.mode=offline",
        f"hydra.sweep.dir={sweep}")
    records = {n: load_record(sweep / str(n) / RECORD_JSON) for n in range(3)}
    # the grid keeps Hydra's numbers; the baseline comes after it, measured the same way
    assert [(r.reducer, r.reducer_params.get("r")) for r in records.values()] == [("tome", 1), ("tome", 2),
                                                                                ("none", None)]
    assert len({json.dumps([r.model, r.weights, r.dataset, r.split, r.measure["batch_size"]]) for r in
                records.values()}) == 1
    overrides = OmegaConf.load(sweep / "2" / ".hydra" / "overrides.yaml")
    assert "reducer=none" in overrides and not any(o.startswith("reducer.") for o in overrides)

    with open(sweep / TABLE_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [(r["reducer"], r["params"]) for r in rows] == [("none", ""), ("tome", "r=1"), ("tome", "r=2")]
    base = records[2]
    assert rows[0]["baseline"] == str(sweep / "2") and float(rows[0]["mac_fraction"]) == 1.0
    for row, record in zip(rows[1:], (records[0], records[1]), strict=True):
        assert row["baseline"] == str(sweep / "2")
        assert float(row["mac_fraction"]) == pytest.approx(record.gmacs / base.gmacs)  # by hand
        assert float(row["speedup"]) == pytest.approx(record.images_per_s / base.images_per_s)
        assert 0 < float(row["mac_fraction"]) < 1 and 0 <= float(row["top1"]) <= 1
    assert "| mac_fraction |" in (sweep / TABLE_MD).read_text()

    # one W&B group for the whole sweep: its directory
    assert len(RecordingWandb.built) == 3
    assert {b["group"] for b in RecordingWandb.built} == {str(sweep)}
    assert [b["name"] for b in RecordingWandb.built] == ["test_vit-tome-r=1", "test_vit-tome-r=2", "test_vit-none"]


def test_wandb_group_is_the_users_in_a_sweep_and_none_in_a_single_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loggers, "WandbLogger", RecordingWandb)
    RecordingWandb.built = []
    cli(monkeypatch, "-m", *SMALL, "measure.enabled=false", "reducer.r=1", "hydra.sweeper.baseline=false",
        "logger=default", "logger.wandb.mode=offline", "logger.wandb.group=mine", f"hydra.sweep.dir={tmp_path / 's'}")
    cli(monkeypatch, *SMALL, "measure.enabled=false", "logger=default", "logger.wandb.mode=offline",
        f"hydra.run.dir={tmp_path / 'run'}")
    assert [b["group"] for b in RecordingWandb.built] == ["mine", None]
    assert not (tmp_path / "s" / "1").exists()  # baseline=false: the grid only


def test_wandb_options_keep_every_setting_but_the_mode():
    options = loggers.wandb_options({"project": "p", "mode": "offline", "group": None, "tags": ["a"]}, "run",
                                    "/tmp/anywhere")
    assert options == {"project": "p", "group": None, "tags": ["a"], "name": "run"}
    assert loggers.wandb_options({"name": "given"}, "run", "/tmp")["name"] == "given"


# --- which baselines a sweep gets -------------------------------------------------------------------
def test_one_baseline_per_group_of_jobs_that_differ_only_in_the_reducer():
    jobs = grid({}, ["experiment=smoke", "measure.batch_size=2,4", "reducer.r=1,2"])
    assert len(jobs) == 4
    assert baselines(jobs, composed) == [["experiment=smoke", "measure.batch_size=2", "reducer=none"],
                                         ["experiment=smoke", "measure.batch_size=4", "reducer=none"]]
    # another reducer, a reducer file, the reducer's loss weights: one group, and none of it in the baseline
    jobs = [["experiment=smoke_finetune", "reducer=pitome", "reducer.ratio=0.9"],
            ["experiment=smoke_finetune", "+loss.reducer_weights.x=2"]]
    assert baselines(jobs, composed) == [["experiment=smoke_finetune", "reducer=none"]]
    assert reducer_override("+reducer_file@reducer=from_file") and not reducer_override("reducer@text_reducer=tome")


@pytest.mark.parametrize("jobs", [
    [["experiment=smoke", "reducer.r=1"], ["experiment=smoke", "reducer=none"]],  # the sweep has it already
    [["experiment=baseline_vit_b"], ["experiment=tome_vit_b"], ["experiment=pitome_vit_b"]],  # sweep=methods_vit_b
    [["experiment=smoke", "task=compare", "reducer=none"]],  # measures the unreduced model itself
    [["experiment=smoke", "task=search", "reducer=none"]],
    [["experiment=smoke", "task=no_such_task"]],  # refused by name when every job is checked
])
def test_no_baseline_where_the_sweep_has_one_or_the_task_measures_its_own(jobs):
    assert baselines(jobs, composed) == []


def test_a_baseline_drops_reducer_keys_an_experiment_of_the_old_kind_sets(tmp_path):
    (tmp_path / "experiment").mkdir()
    header = "# @package _global_\ndefaults:\n  - override /reducer: tome\n  - override /model: test_vit\n"
    (tmp_path / "experiment" / "old_style.yaml").write_text(header + "reducer:\n  r: 2\n  mode: mean\n")
    # a fine-tune's weights of the reducer's loss terms: an unreduced fine-tune reports none of them
    (tmp_path / "experiment" / "old_finetune.yaml").write_text(
        header + "task: finetune\nreducer:\n  r: 2\nloss:\n  reducer_weights: {x: 2.0, y: 0.5}\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    [job] = baselines([[search, "experiment=old_style"]], composed)
    assert job == [search, "experiment=old_style", "reducer=none", "~reducer.r", "~reducer.mode"]
    assert reducer_spec(composed(job).reducer) == ("none", {})
    [job] = baselines([[search, "experiment=old_finetune"]], composed)
    assert job == [search, "experiment=old_finetune", "reducer=none", "~reducer.r", "~loss.reducer_weights.x",
                   "~loss.reducer_weights.y"]
    cfg = composed(job)
    assert reducer_spec(cfg.reducer) == ("none", {}) and dict(cfg.loss.reducer_weights) == {}


def sweep_config(overrides: list[str], **sweeper) -> OmegaConf:
    return OmegaConf.create({"hydra": {"sweeper": {"_target_": SWEEPER, "params": None, **sweeper},
                                       "overrides": {"task": overrides}}})


def test_planned_jobs_are_the_grid_then_the_baselines_unless_switched_off():
    config = sweep_config(["experiment=smoke"], params={"reducer.r": "1,2"})
    assert planned_jobs(config, composed) == [["reducer.r=1", "experiment=smoke"], ["reducer.r=2", "experiment=smoke"],
                                              ["experiment=smoke", "reducer=none"]]
    assert planned_jobs(sweep_config(["reducer.r=1,2"], baseline=False), composed) == [["reducer.r=1"],
                                                                                      ["reducer.r=2"]]
    basic = sweep_config(["reducer.r=1,2"])
    basic.hydra.sweeper._target_ = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert len(planned_jobs(basic, composed)) == 2
    with pytest.raises(ConfigError, match=r"hydra.sweeper.baseline='yes' is invalid; allowed: true .*, false"):
        planned_jobs(sweep_config(["reducer.r=1"], baseline="yes"), composed)


# --- another reducer under an experiment --------------------------------------------------------------
def test_an_experiment_runs_with_no_reducer_given_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(monkeypatch, *SMALL, "measure.enabled=false", "reducer=none", f"hydra.run.dir={tmp_path / 'run'}")
    record = load_record(tmp_path / "run" / RECORD_JSON)
    assert record.status == "finished" and record.reducer == "none" and record.tokens_per_layer[0] == \
        record.tokens_per_layer[-1]


@pytest.mark.parametrize("experiment", ["smoke", "tome_vit_b", "text_sst2"])
def test_another_reducer_under_an_experiment_starts_from_its_own_defaults(experiment):
    name, params = reducer_spec(compose([f"experiment={experiment}", "reducer=pitome"]).reducer)
    assert name == "pitome" and params == {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in tokenreduce.reducer_defaults("pitome").items()}
    build_reducer({"name": name, **params})
    assert reducer_spec(compose([f"experiment={experiment}", "reducer=none"]).reducer) == ("none", {})


def test_an_experiments_preset_still_takes_parameters_from_the_command_line():
    assert reducer_spec(compose(["experiment=tome_vit_b"]).reducer)[1]["r"] == 13
    assert reducer_spec(compose(["experiment=tome_vit_b", "reducer.r=4"]).reducer)[1]["r"] == 4


def test_every_job_and_the_baseline_are_checked_before_the_first_computes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli(monkeypatch, "-m", *SMALL, "reducer.r=1,-1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "job 1 (" in err and "of 3: " in err  # the grid's 2 and the baseline
    assert not list(tmp_path.rglob(RECORD_JSON))


def test_the_sweeper_is_registered_with_hydra_or_its_absence_named(monkeypatch):
    from hydra.core.plugins import Plugins

    from tokenreduce.engine.hydra_callbacks import register_sweeper

    assert register_sweeper() and SWEEPER in Plugins.instance().class_name_to_class
    monkeypatch.setitem(sys.modules, "hydra_plugins.tokenreduce_sweeper", None)  # an install from before it
    assert not register_sweeper()
