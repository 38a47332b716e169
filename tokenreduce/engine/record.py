"""The result record of one run: the numbers and the protocol they were measured under."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenreduce.engine.speed import marks_note
from tokenreduce.errors import ConfigError

RECORD_JSON = "result.json"
RECORD_CSV = "result.csv"
CHECKPOINT_DIR = "checkpoints"
COMPARISON_JSON, COMPARISON_TABLE, COMPARISON_CSV = "comparison.json", "table.md", "table.csv"  # task=compare
SEARCH_STATE, SEARCH_JSON, SEARCH_TABLE, SEARCHED_REDUCER = (  # task=search
    "search_state.json", "search.json", "search.md", "reducer.yaml")
DIFFRATE_STATE = "search_state.pt"  # task=search with DiffRate's search (tensors: torch.save)
TASKS_JSON, TASKS_TABLE = "task_results.json", COMPARISON_TABLE  # the transformers tasks (engine/hf_tasks.py)
TASK_SUMMARY = "task_summary.md"  # a multirun of them
# what an earlier run leaves in its directory; a run never starts where one of these exists
RESULT_PATHS = (RECORD_JSON, RECORD_CSV, CHECKPOINT_DIR, COMPARISON_JSON, COMPARISON_TABLE, COMPARISON_CSV,
                SEARCH_STATE, SEARCH_JSON, SEARCH_TABLE, SEARCHED_REDUCER, DIFFRATE_STATE, TASKS_JSON)


@dataclass
class RunRecord:
    run_name: str
    task: str
    model: str
    weights: str  # the run's starting weights: "timm:<name>", "offline:<name>", "file:<path>", "checkpoint:<path>",
    #               or "random"
    dataset: dict
    split: str
    reducer: str
    reducer_params: dict
    adapter_options: dict = field(default_factory=dict)  # the model family's options not at their defaults
    status: str = "finished"  # or "interrupted" (resume with `resume_command`), "failed" (see `error`)
    top1: float | None = None
    top5: float | None = None
    loss: float | None = None
    images_per_s: float | None = None
    measure: dict = field(default_factory=dict)  # batch_size, dtype, autocast, device, warmup, repeats,
    #               seconds_per_batch, spread, load_before, load_after, cores, threads (`Timing.as_record`)
    precision: str = ""  # the trainer's precision for the evaluation
    gmacs: float | None = None  # multiply-accumulates of one image, in units of 1e9
    tokens_per_layer: list[int] = field(default_factory=list)
    tokens_out: int | None = None
    num_params: int | None = None
    start_step: int = 0
    global_step: int = 0
    resumed_from: str | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    evaluated: str | None = None  # the weights the metrics are of: `weights`, or a fine-tune's checkpoint
    resume_command: str | None = None
    error: str | None = None
    seed: int | None = None
    output_dir: str = ""
    finished: str = ""
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def flat(self) -> dict:
        """One CSV row: nested values as JSON, tokens per layer space-separated."""
        row = {}
        for key, value in self.to_dict().items():
            if key == "tokens_per_layer":
                row[key] = " ".join(str(t) for t in value)
            elif isinstance(value, (dict, list)):
                row[key] = json.dumps(value, sort_keys=True)
            else:
                row[key] = value
        return row

    def metrics(self) -> dict[str, float]:
        """The numeric results, for a metrics logger."""
        values = {"top1": self.top1, "top5": self.top5, "loss": self.loss, "images_per_s": self.images_per_s,
                  "gmacs": self.gmacs, "tokens_out": self.tokens_out}
        return {k: float(v) for k, v in values.items() if v is not None}

    def write(self, output_dir: str | Path) -> list[Path]:
        """result.json and result.csv in `output_dir`; an existing file is never overwritten."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        row = self.flat()
        writer = csv.DictWriter(buffer, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
        json_text = json.dumps(self.to_dict(), indent=2) + "\n"
        written_csv = write_new(output_dir / RECORD_CSV, buffer.getvalue())
        # result.json last: the collector looks for it, so its presence means the whole record is there
        return [write_new(output_dir / RECORD_JSON, json_text), written_csv]

    def table(self) -> str:
        """The record as a two-column text table, for the terminal."""

        def fmt(value) -> str:
            if value is None:
                return "-"
            if isinstance(value, float):
                return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
            if isinstance(value, dict):
                return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
            if isinstance(value, list):
                return " ".join(str(v) for v in value)
            return str(value)

        rows = [
            ("run", self.run_name), ("task", self.task),
            ("status", self.status if self.status != "finished" else None), ("error", self.error),
            ("model", self.model), ("weights", self.weights),
            ("data", f"{self.dataset.get('name', '?')} ({self.split})"),
            ("reducer", f"{self.reducer} {fmt(self.reducer_params)}".strip()),
            ("top-1", self.top1), ("top-5", self.top5), ("loss", self.loss),
            ("images/s", f"{fmt(self.images_per_s)} {marks_note(self.measure)}".rstrip()
             if self.images_per_s is not None else None),
            ("measured", fmt({k: self.measure.get(k) for k in ("batch_size", "dtype", "autocast", "device")})
             if self.measure else None),
            ("GMACs", self.gmacs), ("tokens/layer", self.tokens_per_layer),
            ("steps", f"{self.start_step} -> {self.global_step}" if self.task == "finetune" else None),
            ("output", self.output_dir),
            ("resume", self.resume_command),
        ]
        rows = [(k, fmt(v)) for k, v in rows if v is not None]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _exists_error(path: Path) -> ConfigError:
    return ConfigError(f"{path} already exists; a run never overwrites an earlier run's results")


@contextlib.contextmanager
def staged_file(path: str | Path, *, replace: bool = False, commit: bool = True) -> Iterator[Path]:
    """A temporary name beside `path` to write the file to. When the block ends without an error the
    file is synced to disk and takes its name (an existing `path` is refused unless `replace`; nothing
    is committed where `commit` is false, e.g. on a rank that writes no checkpoint); whatever happens,
    the temporary is gone. A failed write (a full disk) so leaves no partial file under the name."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield temporary
        if commit:
            _sync(temporary)
            if replace:
                os.replace(temporary, path)
            else:
                _link_new(temporary, path)
            with contextlib.suppress(OSError):  # the name's durability; some filesystems cannot sync a directory
                _sync(path.parent)
    except OSError as err:  # name the file being written, not its temporary (or nothing)
        if err.errno is None or (err.filename is not None and str(err.filename) != str(temporary)):
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        temporary.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(temporary: Path, path: Path) -> None:
    """Give `temporary` the name `path` unless that exists (a rename would overwrite it)."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):  # filesystems without hard links
            raise
        if path.exists():
            raise _exists_error(path) from None
        os.rename(temporary, path)


def csv_table(rows: list[dict], columns) -> str:
    """`rows` as CSV text with `columns`; a row's `params` (a reducer's settings) as sorted JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows({**row, "params": json.dumps(row["params"], sort_keys=True)} for row in rows)
    return buffer.getvalue()


def write_new(path: str | Path, text: str) -> Path:
    """Write `text` to a file that must not exist yet (a run never overwrites an earlier one's
    results), through `staged_file`: a failed write leaves no partial file."""
    path = Path(path)
    if path.exists():
        raise _exists_error(path)
    with staged_file(path) as temporary, open(temporary, "w", newline="") as f:
        f.write(text)
    return path


def save_figure(figure, path: str | Path, **kwargs) -> Path:
    """`figure.savefig(path, **kwargs)` to a new file, through `staged_file` like `write_new`."""
    path = Path(path)
    if path.exists():
        raise _exists_error(path)
    with staged_file(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".") or None, **kwargs)
    return path


def ensure_fresh(output_dir: str | Path) -> None:
    """Refuse to run in a directory that holds an earlier run's results or checkpoints."""
    output_dir = Path(output_dir)
    found = [name for name in RESULT_PATHS if (output_dir / name).exists()]
    if found:
        raise ConfigError(
            f"the run directory {output_dir} already holds {', '.join(found)} from an earlier run; "
            "a run never overwrites results: use a new hydra.run.dir (the default is a new timestamped folder)"
        )


LOCK_FILE = ".tokenreduce.lock"  # in a run (or sweep) directory while a run holds it
_held: dict[tuple[Path, int], int] = {}  # (directory, thread) -> how many times that thread holds it
log = logging.getLogger(__name__)


@contextlib.contextmanager
def hold_run_directory(directory: str | Path) -> Iterator[Path]:
    """Hold `directory` for one run: an exclusive lock on its `LOCK_FILE`, so that a second run
    started into it is refused at once (ConfigError) instead of overwriting the first one's
    checkpoints and logs. The thread holding it may enter again (the CLI holds it from a Hydra
    callback, then `run` does). The directory is created if needed, and removed again at the end
    when the run left nothing in it."""
    directory = Path(directory).resolve()
    key = (directory, threading.get_ident())
    if key in _held:
        _held[key] += 1
        try:
            yield directory
        finally:
            _held[key] -= 1
        return
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    try:
        fd = _lock(lock)
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = 1
    try:
        yield directory
    finally:
        del _held[key]
        if fd is not None:
            lock.unlink(missing_ok=True)  # while still locked: see _lock
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for processes forked meanwhile (loader workers), which share it
            os.close(fd)
        _remove_empty(created)


def _lock(lock: Path) -> int | None:
    """The descriptor of `lock`, locked; None where the filesystem has no locks."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"the run directory {lock.parent} is held by another run (its lock file {lock.name} is locked); "
                "two runs never write into one directory: use another hydra.run.dir (hydra.sweep.dir for a "
                "multirun), or wait for that run to end"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            log.warning("cannot lock %s (%s): nothing stops a second run from writing into this directory",
                        lock.parent, err.strerror)
            return None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # the holder removed this file as it ended: lock the new one


def _remove_empty(created: list[Path]) -> None:
    for directory in created:  # deepest first
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def load_record(path: str | Path) -> RunRecord:
    with open(path) as f:
        return RunRecord.from_dict(json.load(f))
