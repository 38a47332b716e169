"""The console: progress as dated lines where standard output is not a terminal, and what the console
shows also in the run's log file (Hydra's tokenreduce.log)."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import cli
from hydra.core.global_hydra import GlobalHydra

from tokenreduce.engine import console
from tokenreduce.engine.console import PACE_VARIABLE, Progress, pace_seconds, progress, show
from tokenreduce.errors import ConfigError

DATED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (.*)$")


def dated_lines(text: str) -> list[str]:
    """The undated text of every dated line."""
    return [m.group(1) for line in text.splitlines() if (m := DATED.match(line))]


@pytest.fixture
def log_file(tmp_path):
    """A file handler on the root logger, as Hydra sets one up for the run's log."""
    path = tmp_path / "run.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    yield path
    logging.getLogger().removeHandler(handler)
    handler.close()


def test_progress_off_a_terminal_writes_a_dated_line_per_step_at_pace_zero(monkeypatch, capsys):
    monkeypatch.setenv(PACE_VARIABLE, "0")
    with Progress("phase", 3, "things") as shown:
        for i in range(3):
            shown.update(1, f"item {i}")
    lines = dated_lines(capsys.readouterr().out)
    assert [re.sub(r", \d+ s", ", N s", line) for line in lines] == [
        "phase: 0/3 things, N s", "phase: 1/3 things, N s; item 0", "phase: 2/3 things, N s; item 1",
        "phase: 3/3 things, N s; item 2"]  # the end is the last step's line, not said twice


def test_a_note_given_as_a_function_is_made_only_for_the_lines_shown(monkeypatch, capsys):
    monkeypatch.setenv(PACE_VARIABLE, "10")
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    made = []

    def note():
        made.append(now[0])
        return f"loss at {now[0]:.0f}"

    shown = Progress("fit", 4, "batches")
    for t in (101.0, 103.0, 112.0, 113.0):
        now[0] = t
        shown.update(1, note)
    shown.close()
    lines = dated_lines(capsys.readouterr().out)
    assert lines == ["fit: 0/4 batches, 0 s", "fit: 3/4 batches, 12 s; loss at 112",
                     "fit: 4/4 batches, 13 s; loss at 113"]
    assert made == [112.0, 113.0]  # not at the batches no line showed


def test_progress_keeps_its_pace_and_always_says_the_start_and_the_end(monkeypatch, capsys):
    monkeypatch.setenv(PACE_VARIABLE, "3600")
    assert list(progress(range(5), "slow phase", unit="items")) == [0, 1, 2, 3, 4]
    lines = dated_lines(capsys.readouterr().out)
    assert [line.split(",")[0] for line in lines] == ["slow phase: 0/5 items", "slow phase: 5/5 items"]
    # a time that has come: a line at the next step, with the note given so far
    monkeypatch.setenv(PACE_VARIABLE, "10")
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    shown = Progress("paced", None, "steps")
    now[0] = 105.0
    shown.update(1)  # 5 s after the start line: too soon
    now[0] = 111.0
    shown.update(0, "note")  # time has come, and a step not shown yet
    shown.update(1)  # 0 s after that line
    now[0] = 115.0
    shown.update(1)
    shown.close()
    idle = Progress("idle", 2, "steps")
    now[0] = 200.0
    idle.update(0, "waiting")  # nothing new counted: no line however long it has been
    idle.update(2)
    idle.close()
    lines = dated_lines(capsys.readouterr().out)
    assert lines == ["paced: 0 steps, 0 s", "paced: 1 steps, 11 s; note", "paced: 3 steps, 15 s; note",
                     "idle: 0/2 steps, 0 s", "idle: 2/2 steps, 85 s; waiting"]


def test_pace_comes_from_the_environment_and_a_bad_one_is_refused(monkeypatch):
    monkeypatch.delenv(PACE_VARIABLE, raising=False)
    assert pace_seconds() == 30
    monkeypatch.setenv(PACE_VARIABLE, "2.5")
    assert pace_seconds() == 2.5
    for bad in ("-1", "soon", "nan", "inf"):
        monkeypatch.setenv(PACE_VARIABLE, bad)
        with pytest.raises(ConfigError, match=f"{PACE_VARIABLE}='{bad}' is invalid"):
            pace_seconds()


def test_show_prints_once_and_writes_the_log_file(log_file, capsys):
    console_handler = logging.StreamHandler()  # Hydra's console handler on the root logger: not used by show
    logging.getLogger().addHandler(console_handler)
    try:
        show("| a | table |\n| 1 | 2 |")
        show("results: /somewhere")
    finally:
        logging.getLogger().removeHandler(console_handler)
    captured = capsys.readouterr()
    assert captured.out == "| a | table |\n| 1 | 2 |\nresults: /somewhere\n" and captured.err == ""
    assert log_file.read_text() == ("[tokenreduce][INFO] - \n| a | table |\n| 1 | 2 |\n"
                                    "[tokenreduce][INFO] - results: /somewhere\n")


def test_progress_lines_go_into_the_log_undated(monkeypatch, log_file, capsys):
    monkeypatch.setenv(PACE_VARIABLE, "0")
    list(progress(["a"], "phase", unit="items"))
    assert len(dated_lines(capsys.readouterr().out)) == 2
    logged = log_file.read_text().splitlines()
    assert [re.sub(r"\d+ s", "N s", line) for line in logged] == ["[tokenreduce][INFO] - phase: 0/1 items, N s",
                                                                 "[tokenreduce][INFO] - phase: 1/1 items, N s"]


def test_at_a_terminal_a_bar_with_lines_above_it_and_the_last_state_in_the_log(monkeypatch, log_file, capsys):
    monkeypatch.setenv(PACE_VARIABLE, "0")
    with Progress("phase", 2, "things", bar=True) as shown:
        shown.update(1)
        show("a row")
        shown.update(1)
    out = capsys.readouterr().out
    assert "a row\n" in out and not dated_lines(out)  # the bar, not lines
    logged = log_file.read_text()
    assert "- a row\n" in logged and re.search(r"- phase: 2/2 things, \d+ s\n", logged)
    assert console._bars == []


def test_the_run_log_holds_what_the_console_showed(tmp_path, monkeypatch, capsys):
    """smoke (evaluate) and smoke_finetune in-process, their output not a terminal: the record's table
    and its path, Lightning's messages and the fine-tune's progress lines are in tokenreduce.log."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PACE_VARIABLE, "0")
    small = ["data.train_samples=8", "data.val_samples=8", "data.batch_size=4", "measure.warmup=0",
             "measure.repeats=2"]
    cli(monkeypatch, "experiment=smoke", *small, f"hydra.run.dir={tmp_path / 'evaluate'}")
    cli(monkeypatch, "experiment=smoke_finetune", *small, "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'finetune'}")
    out = capsys.readouterr().out
    for run in ("evaluate", "finetune"):
        logged = (tmp_path / run / "tokenreduce.log").read_text()
        assert f"output        {tmp_path / run}" in logged and "\ntop-1         " in logged, logged
        assert "validation: 2/2 batches" in logged  # Lightning's progress, as lines
        assert "GPU available" in logged  # Lightning's own messages reach the log
        assert "Tip:" not in logged  # but not its advertisement
        assert f"output        {tmp_path / run}" in out
    logged = (tmp_path / "finetune" / "tokenreduce.log").read_text()
    assert "fit, epoch 1/1: 2/2 batches" in logged and "train/loss" in logged
    assert "fit, epoch 1/1: 2/2 batches" in out and out.count(f"output        {tmp_path / 'finetune'}") == 1


def test_a_failed_run_leaves_its_traceback_in_the_log(tmp_path, monkeypatch, capsys):
    from tokenreduce.engine import run as run_module

    def fail(*args, **kwargs):
        raise RuntimeError("the disk went away")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_module, "run", fail)
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit):
        cli(monkeypatch, "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}")
    logged = (tmp_path / "run" / "tokenreduce.log").read_text()
    assert "[ERROR] - \nthe run stopped:\nTraceback" in logged and "RuntimeError: the disk went away" in logged
