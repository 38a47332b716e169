"""A run holds its directory: a second run started into it, in process or from the command line, and
a second multirun into one sweep directory, are refused at once and touch nothing."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tokenreduce.engine.config import compose
from tokenreduce.engine.hydra_callbacks import FreshRunDirectory, discard_refused_run
from tokenreduce.engine.record import LOCK_FILE, RECORD_JSON, hold_run_directory
from tokenreduce.engine.run import run
from tokenreduce.errors import ConfigError

SMOKE = ["experiment=smoke", "trainer.enable_progress_bar=false", "data.train_samples=8", "data.val_samples=8",
         "data.batch_size=4", "measure.enabled=false", "logger=csv"]
HOLDER = """
import sys
from tokenreduce.engine.record import hold_run_directory
with hold_run_directory(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


pytestmark = pytest.mark.usefixtures("clean_hydra")


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def lock_elsewhere(directory: Path) -> int:
    """Lock `directory` as another process would: another open file of its lock file."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def is_locked(directory: Path) -> bool:
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_second_run_into_a_held_directory_is_refused_before_anything(tmp_path, monkeypatch):
    import tokenreduce.engine.run as engine

    directory = tmp_path / "run"
    fd = lock_elsewhere(directory)
    (directory / "metrics.csv").write_text("the first run's\n")
    before = snapshot(directory)
    monkeypatch.setattr(engine, "check_task", lambda *a, **k: pytest.fail("looked at the configuration"))
    with pytest.raises(ConfigError, match=f"the run directory {directory} is held by another run"):
        run(compose(SMOKE), directory)
    assert snapshot(directory) == before
    os.close(fd)


def test_a_run_holds_its_directory_until_it_ends_then_leaves_no_lock(tmp_path, monkeypatch):
    import tokenreduce.engine.run as engine

    directory = tmp_path / "run"
    seen = []

    def check_task(cfg):
        seen.append(is_locked(directory))  # another process would find it locked
        return real(cfg)

    real = engine.check_task
    monkeypatch.setattr(engine, "check_task", check_task)
    run(compose(SMOKE), directory)
    assert seen and all(seen)
    assert not is_locked(directory) and not (directory / LOCK_FILE).exists() and (directory / RECORD_JSON).is_file()


def test_another_thread_holding_the_directory_refuses_this_one(tmp_path):
    directory = tmp_path / "run"
    held, done = threading.Event(), threading.Event()

    def first_run():
        with hold_run_directory(directory):
            held.set()
            done.wait(30)

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(ConfigError, match="held by another run"), hold_run_directory(directory):
            pass
    finally:
        done.set()
        thread.join()
    with hold_run_directory(directory):  # free again; and the same thread may enter twice
        with hold_run_directory(directory):
            assert is_locked(directory)
        assert is_locked(directory)
    assert not directory.exists()  # made for the run, which left nothing in it

    directory.mkdir()
    (directory / LOCK_FILE).touch()  # left by a run killed with SIGKILL: the system released its lock
    with hold_run_directory(directory):
        assert is_locked(directory)
    assert directory.is_dir() and not (directory / LOCK_FILE).exists()


def test_the_command_line_refuses_a_held_run_directory(tmp_path):
    directory = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(directory)
        refused = subprocess.run([sys.executable, "-m", "tokenreduce", *SMOKE, f"hydra.run.dir={directory}"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"tokenreduce: error: the run directory {directory} is held by another run" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert snapshot(directory) == before  # no .hydra/, no log
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not directory.exists()


def test_hydra_callbacks_hold_the_run_and_the_sweep_directory(tmp_path, capsys):
    callback = FreshRunDirectory()
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    config = OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}, "sweep": {"dir": str(sweep_dir)}}})
    callback.on_run_start(config)
    assert is_locked(run_dir)
    callback.on_run_end(config)
    assert not is_locked(run_dir) and not run_dir.exists()

    fd = lock_elsewhere(sweep_dir)
    with pytest.raises(SystemExit) as stop:
        callback.on_multirun_start(config)
    assert stop.value.code == 2 and f"the run directory {sweep_dir} is held by another run" in capsys.readouterr().err
    os.close(fd)
    callback.on_multirun_start(config)
    assert is_locked(sweep_dir)
    callback.on_multirun_end(config)
    assert not is_locked(sweep_dir)


def test_a_refused_run_directory_holding_only_the_lock_is_discarded(tmp_path):
    callback = FreshRunDirectory()
    run_dir = tmp_path / "new"
    callback.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}}))
    (run_dir / ".hydra").mkdir()
    (run_dir / "tokenreduce.log").write_text("")
    assert discard_refused_run(run_dir) and not run_dir.exists()
