"""Timings under load: the spread of a timing's rounds and the machine's load, recorded and marked."""

from __future__ import annotations

import csv
import io

import pytest
import torch

from tokenreduce.engine import compare, speed
from tokenreduce.engine.compare import Setting, csv_text, markdown_table, time_settings
from tokenreduce.engine.config import compose
from tokenreduce.engine.record import RunRecord
from tokenreduce.engine.run import run
from tokenreduce.engine.speed import (
    LOADED,
    NOISY,
    SPREAD_LIMIT,
    TIMING_LEGEND,
    marks_note,
    spread,
    timing_marks,
)

UNSTEADY = [1.0, 1.2, 0.9]  # (1.2 - 0.9) / median 1.0 = 30 % apart
STEADY = [1.0, 1.05, 1.0]  # 5 % apart


@pytest.fixture
def machine(monkeypatch):
    """A machine of 4 cores whose load average reads, in turn, the values put into `readings`."""
    readings = []
    monkeypatch.setattr(speed, "load_average", lambda: readings.pop(0))
    monkeypatch.setattr(speed.os, "cpu_count", lambda: 4)
    return readings


def fake_throughput(monkeypatch, seconds):
    monkeypatch.setattr(speed, "time_forward", lambda *args, **kwargs: list(seconds))
    return speed.throughput(torch.nn.Identity(), torch.zeros(2, 3))


def test_a_timing_records_its_spread_and_the_load(monkeypatch, machine):
    machine += [3.0, 5.5]
    timing = fake_throughput(monkeypatch, UNSTEADY)
    assert timing.spread == pytest.approx(0.3)
    assert timing.images_per_s == pytest.approx(2.0)  # batch over the median, as before
    assert (timing.load.before, timing.load.after, timing.load.cores) == (3.0, 5.5, 4)
    assert timing.load.threads == torch.get_num_threads()
    record = timing.as_record(warmup=1, repeats=3)
    assert list(record) == ["batch_size", "dtype", "autocast", "device", "warmup", "repeats", "seconds_per_batch",
                            "spread", "load_before", "load_after", "cores", "threads"]
    assert record["spread"] == pytest.approx(0.3) and record["load_after"] == 5.5
    assert timing.marks == NOISY + LOADED  # rounds 30 % apart, load 5.5 on 4 cores


def test_a_steady_timing_on_an_idle_machine_is_not_marked(monkeypatch, machine):
    machine += [1.0, 5.0]  # the core count + LOAD_MARGIN, not above it: this run's own threads count in it
    timing = fake_throughput(monkeypatch, STEADY)
    assert timing.spread == pytest.approx(0.05) and timing.marks == ""


def test_the_spread_is_the_quartiles_over_the_median_so_one_slow_round_is_not_a_disagreement():
    # five rounds: lower and upper quartile are the 2nd and 4th of the sorted seconds, the median the 3rd
    assert spread([1.0, 1.02, 0.98, 1.6, 1.01]) == pytest.approx((1.02 - 1.0) / 1.01)
    assert spread([1.0, 1.3, 0.8, 1.25, 1.1]) == pytest.approx((1.25 - 1.0) / 1.1)  # most rounds disagree
    by_hand = sorted([0.5, 0.9, 0.6, 0.7, 0.55, 0.8, 0.65, 0.75, 0.95, 0.52])  # ten: the 3rd and 8th, median the 6th
    assert spread(by_hand) == pytest.approx((by_hand[7] - by_hand[2]) / by_hand[5])
    assert spread([2.0, 3.0]) == pytest.approx(1 / 3) and spread([]) is None  # two rounds: (max - min) / upper


@pytest.mark.parametrize("measure, marks", [
    ({"spread": SPREAD_LIMIT}, ""), ({"spread": SPREAD_LIMIT + 0.001}, NOISY),
    ({"spread": 0.0, "load_before": 3.5, "load_after": 1.0, "cores": 2}, LOADED),  # before counts too
    ({"spread": 0.0, "load_before": 2.1, "load_after": 2.9, "cores": 2}, ""),  # a quiet machine under its own run
    ({"spread": 0.0, "load_before": None, "load_after": None, "cores": 2}, ""),  # a system without load averages
    ({"batch_size": 8, "dtype": "float32"}, ""),  # a record written before spread and load were kept
    ({}, ""),
])
def test_marks_follow_the_spread_limit_and_the_core_count(measure, marks):
    assert timing_marks(measure) == marks


def test_the_record_table_marks_and_explains_its_images_per_s():
    fields = dict(run_name="r", task="evaluate", model="m", weights="random", dataset={"name": "d"}, split="val",
                  reducer="none", reducer_params={}, images_per_s=412.3)
    measure = {"batch_size": 8, "dtype": "float32", "autocast": None, "device": "cpu", "spread": 0.35,
               "load_before": 7.9, "load_after": 3.0, "cores": 2, "threads": 2}
    line = next(x for x in RunRecord(**fields, measure=measure).table().splitlines() if x.startswith("images/s"))
    assert line.split(None, 1)[1] == "412.3 ~! (rounds 35% apart, over 10%; load average 7.9 over 2 cores)"
    steady = {**measure, "spread": 0.02, "load_before": 0.5, "load_after": 1.0}
    line = next(x for x in RunRecord(**fields, measure=steady).table().splitlines() if x.startswith("images/s"))
    assert line.split(None, 1)[1] == "412.3"
    assert marks_note(steady) == ""


def compare_settings(monkeypatch, times: list[list[float]], loads: list[float]) -> list[Setting]:
    """The baseline and two ToMe settings timed with `times` (one list of rounds each) under `loads`."""
    monkeypatch.setattr(compare, "interleaved_times", lambda *args: [list(t) for t in times])
    monkeypatch.setattr(compare, "load_average", lambda: loads[0])
    monkeypatch.setattr(speed, "load_average", lambda: loads[1])
    monkeypatch.setattr(speed.os, "cpu_count", lambda: 4)
    settings = [Setting("none", {}, None), Setting("tome", {"r": 1}, 0.75), Setting("tome", {"r": 2}, 0.5)]
    for s in settings:
        s.top1, s.tokens = 0.5, 10
    load = time_settings(torch.nn.Identity(), settings, torch.zeros(2, 3), warmup=0, rounds=3)
    assert (load.before, load.after, load.cores) == (loads[0], loads[1], 4)
    return settings


def test_compare_marks_the_row_whose_rounds_disagree(monkeypatch):
    settings = compare_settings(monkeypatch, [STEADY, UNSTEADY, [0.5, 0.5, 0.51]], loads=[1.0, 2.0])
    assert [s.speedup for s in settings] == pytest.approx([1.0, 1.0, 2.0])
    assert [s.marks for s in settings] == ["", NOISY, ""]
    assert settings[1].spread == pytest.approx(0.3)
    table = markdown_table(settings).splitlines()
    assert [row.split(" | ")[5] for row in table[2:5]] == ["1.00x", "1.00x ~", "2.00x"]  # columns as before
    assert table[-1] == f"Timing marks: {TIMING_LEGEND}."
    rows = list(csv.DictReader(io.StringIO(csv_text(settings))))
    assert list(rows[0]) == ["reducer", "params", "mac_fraction", "top1", "speedup", "tokens", "spread", "marks"]
    assert [(float(r["spread"]), r["marks"]) for r in rows] == [(pytest.approx(0.05), ""), (pytest.approx(0.3), "~"),
                                                                 (pytest.approx(0.02), "")]


def test_compare_marks_every_row_on_a_loaded_machine_and_all_after_an_unsteady_baseline(monkeypatch):
    settings = compare_settings(monkeypatch, [STEADY, STEADY, STEADY], loads=[1.0, 6.0])
    assert [s.marks for s in settings] == [LOADED] * 3
    settings = compare_settings(monkeypatch, [UNSTEADY, STEADY, STEADY], loads=[1.0, 1.0])
    assert [s.marks for s in settings] == [NOISY] * 3  # every speed-up is over the unsteady baseline


# --- end to end: a run's record keeps the spread and the load ------------------------------------------
def test_an_evaluation_records_spread_and_load(tmp_path, monkeypatch, machine, clean_hydra, capsys):
    machine += [9.0, 9.5]
    cfg = compose(["experiment=smoke", "trainer.enable_progress_bar=false", "data.train_samples=8",
                   "data.val_samples=4", "data.batch_size=4", "measure.warmup=0", "measure.repeats=2"])
    record = run(cfg, tmp_path / "run")
    measure = record.measure
    assert (measure["load_before"], measure["load_after"], measure["cores"]) == (9.0, 9.5, 4)
    times = measure["seconds_per_batch"]
    assert measure["spread"] == pytest.approx((max(times) - min(times)) / max(times))  # median of 2: the upper
    assert measure["threads"] == torch.get_num_threads() and measure["warmup"] == 0 and measure["repeats"] == 2
    assert LOADED in timing_marks(measure)
    printed = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("images/s"))
    assert "load average 9.5 over 4 cores" in printed
