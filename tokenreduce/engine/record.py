"""The result record of one run: the numbers and the protocol they were measured under."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    measure: dict = field(default_factory=dict)  # batch_size, dtype, autocast, device, repeats, warmup
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
        return [write_new(output_dir / RECORD_JSON, json_text), write_new(output_dir / RECORD_CSV, buffer.getvalue())]

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
            ("images/s", self.images_per_s),
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


def write_new(path: Path, text: str) -> Path:
    """Write `text` to a file that must not exist yet: a run never overwrites an earlier one's results."""
    try:
        with open(path, "x", newline="") as f:
            f.write(text)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; a run never overwrites an earlier run's results") from None
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


def load_record(path: str | Path) -> RunRecord:
    with open(path) as f:
        return RunRecord.from_dict(json.load(f))
