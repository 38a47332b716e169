"""A full disk while a run writes its results or checkpoints leaves no partial file under the final
name and no temporary beside it, and the error says what happened to which file."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from tokenreduce.engine import record as record_module
from tokenreduce.engine.config import compose
from tokenreduce.engine.record import RECORD_CSV, RECORD_JSON, load_record, staged_file, write_new
from tokenreduce.engine.run import run
from tokenreduce.errors import ConfigError

SMOKE = ["experiment=smoke", "trainer.enable_progress_bar=false", "data.train_samples=8", "data.val_samples=8",
         "data.batch_size=4", "measure.enabled=false", "logger=csv"]
FINETUNE = ["experiment=smoke_finetune", *SMOKE[1:], "data.num_classes=4", "trainer.max_epochs=1"]


pytestmark = pytest.mark.usefixtures("clean_hydra")


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


class FullAfterTenBytes:
    """A text file on a disk that fills up after ten bytes."""

    def __init__(self, path, mode="r", **kwargs):
        self.file = builtins.open(path, mode, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, text: str) -> int:
        self.file.write(text[:10])
        self.file.flush()
        raise disk_full()


def test_write_new_leaves_nothing_when_the_disk_fills(tmp_path, monkeypatch):
    monkeypatch.setattr(record_module, "open", FullAfterTenBytes, raising=False)
    target = tmp_path / RECORD_JSON
    with pytest.raises(OSError) as failure:
        write_new(target, '{"top1": 0.5}\n')
    assert files(tmp_path) == []
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(target)
    assert f"No space left on device: '{target}'" in str(failure.value)


def test_write_new_never_replaces_and_a_staged_file_is_complete_or_absent(tmp_path):
    target = tmp_path / "table.md"
    write_new(target, "first\n")
    with pytest.raises(ConfigError, match="already exists"):
        write_new(target, "second\n")
    # a file that appears while the new one is written (another process) is not replaced either
    other = tmp_path / "other.md"
    with pytest.raises(ConfigError, match="already exists"):
        with staged_file(other) as temporary:
            temporary.write_text("mine\n")
            other.write_text("theirs\n")
    assert target.read_text() == "first\n" and other.read_text() == "theirs\n"
    assert files(tmp_path) == ["other.md", "table.md"]


def test_a_run_whose_record_cannot_be_written_leaves_no_record(tmp_path, monkeypatch):
    monkeypatch.setattr(record_module, "open", FullAfterTenBytes, raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        run(compose(SMOKE), tmp_path / "run")
    assert not (tmp_path / "run" / RECORD_JSON).exists() and not (tmp_path / "run" / RECORD_CSV).exists()
    assert not [name for name in files(tmp_path / "run") if "result" in name]


@pytest.mark.parametrize("failing", ["best", "last"])
def test_a_checkpoint_that_cannot_be_written_leaves_no_file(tmp_path, monkeypatch, failing):
    save = L.Trainer.save_checkpoint

    def save_on_a_full_disk(trainer, filepath, weights_only=False, storage_options=None):
        if failing not in Path(filepath).name:
            return save(trainer, filepath, weights_only, storage_options)
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)  # as Lightning does
        Path(filepath).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise disk_full()

    monkeypatch.setattr(L.Trainer, "save_checkpoint", save_on_a_full_disk)
    with pytest.raises(OSError) as failure:
        run(compose(FINETUNE), tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    written = files(checkpoints) if checkpoints.exists() else []
    assert not [name for name in written if failing in name]  # neither the final name nor a temporary
    assert all(torch.load(checkpoints / name, weights_only=False)["global_step"] == 2 for name in written)
    assert failure.value.errno == errno.ENOSPC
    assert Path(failure.value.filename).name.startswith(failing) and Path(failure.value.filename).suffix == ".ckpt"
    record = load_record(tmp_path / "run" / RECORD_JSON)  # the failure is recorded
    assert record.status == "failed" and "No space left on device" in record.error


def test_a_search_state_that_cannot_be_written_keeps_the_one_before(tmp_path, monkeypatch):
    from tokenreduce.engine import search

    state = tmp_path / "search_state.pt"
    search._save_state(state, {"step": 1})

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise disk_full()

    monkeypatch.setattr(search.torch, "save", save_on_a_full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        search._save_state(state, {"step": 2})
    monkeypatch.undo()
    assert torch.load(state, weights_only=True) == {"step": 1}
    assert files(tmp_path) == ["search_state.pt"]


def test_a_plot_that_cannot_be_written_leaves_no_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from tokenreduce.viz import plot_tradeoff

    savefig = Figure.savefig

    def savefig_on_a_full_disk(self, fname, **kwargs):
        savefig(self, fname, **kwargs)
        with open(fname, "r+b") as f:
            f.truncate(100)
        raise disk_full()

    rows = [{"reducer": "none", "params": {}, "top1": 80.0, "mac_fraction": 1.0},
            {"reducer": "tome", "params": {"r": 4}, "top1": 78.0, "mac_fraction": 0.7}]
    monkeypatch.setattr(Figure, "savefig", savefig_on_a_full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        plot_tradeoff(rows, "mac_fraction", tmp_path / "plot.png")
    assert files(tmp_path) == []
    monkeypatch.undo()
    plot_tradeoff(rows, "mac_fraction", tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files(tmp_path) == ["plot.png"]
