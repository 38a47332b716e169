"""No code runs from a loaded file: every `torch.load` in the package and the experiments reads
only tensors and plain values, and a search state that would run code is refused."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from tokenreduce.engine.config import compose
from tokenreduce.engine.record import DIFFRATE_STATE
from tokenreduce.engine.run import run
from tokenreduce.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tokenreduce", "experiments")
# a DiffRate search on the smoke experiment (tests/test_search.py runs it through)
TASK = ["experiment=smoke", "reducer=none", "task=search", "search.reducer=diffrate", "budget.macs=0.7",
        "search.steps=2", "search.images=8", "search.batch_size=4", "search.test_images=8", "data.val_samples=8",
        "data.batch_size=4", "trainer.enable_progress_bar=false", "measure.warmup=0", "measure.repeats=2",
        "measure.batch_size=2"]


def unsafe_loads(source: str) -> list[int]:
    """Lines of the `torch.load` calls in `source` (through any alias: `import torch as t`,
    `from torch import load`, `torch.serialization.load`) without a literal `weights_only=True`."""
    tree = ast.parse(source)
    modules = {"torch": "torch"}  # local name -> the module it is bound to
    loads = set()  # local names bound to torch.load itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("torch", "torch.serialization"):
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            for alias in node.names:
                if alias.name == "load":
                    loads.add(alias.asname or "load")
                elif alias.name == "serialization":
                    modules[alias.asname or "serialization"] = "torch.serialization"
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not _is_torch_load(node.func, modules, loads):
            continue
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in node.keywords)
        if not safe:
            lines.append(node.lineno)
    return lines


def _is_torch_load(func: ast.expr, modules: dict[str, str], loads: set[str]) -> bool:
    if isinstance(func, ast.Name):
        return func.id in loads
    if not isinstance(func, ast.Attribute) or func.attr != "load":
        return False
    owner = func.value
    if isinstance(owner, ast.Name):  # torch.load, t.load, serialization.load
        return owner.id in modules
    # torch.serialization.load
    return (isinstance(owner, ast.Attribute) and owner.attr == "serialization" and isinstance(owner.value, ast.Name)
            and modules.get(owner.value.id) == "torch")


@pytest.mark.parametrize("source, unsafe", [
    ("import torch\ntorch.load(p, weights_only=True)", []),
    ("import torch\ntorch.load(p)", [2]),
    ("import torch\ntorch.load(p, weights_only=False)", [2]),
    ("import torch\ntorch.load(p, weights_only=flag)", [2]),  # only a literal True is known safe
    ("import torch as t\nt.load(p)", [2]),
    ("from torch import load\nload(p)", [2]),
    ("from torch import load as read\nread(p, map_location='cpu')", [2]),
    ("import torch\ntorch.serialization.load(p)", [2]),
    ("from torch import serialization\nserialization.load(p)", [2]),
    ("import torch.serialization as s\ns.load(p)", [2]),
    ("import json\njson.load(f)\nimport yaml\nyaml.load(f)", []),
])
def test_the_scan_finds_every_spelling_of_an_unsafe_torch_load(source, unsafe):
    assert unsafe_loads(source) == unsafe


def test_every_torch_load_reads_only_tensors_and_plain_values():
    found = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = unsafe_loads(path.read_text())
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    assert found == {}, f"torch.load without weights_only=True: {found}"


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("nested", [False, True], ids=["pickle", "inside_a_state"])
def test_a_search_state_that_would_run_code_is_refused_before_any_compute(tmp_path, fresh_hydra, nested):
    marker = tmp_path / "ran"
    saved = tmp_path / "earlier"
    saved.mkdir()
    payload = RunsCode(marker)
    torch.save({"step": 1, "history": [], "config": payload} if nested else payload, saved / DIFFRATE_STATE)
    with pytest.raises(ConfigError, match=f"search.resume={saved / DIFFRATE_STATE} is refused"):
        run(compose([*TASK, f"search.resume={saved}"]), tmp_path / "run")
    assert not marker.exists()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("content", [b"", b'{"step": 3}'], ids=["empty", "json"])
def test_a_file_that_is_no_search_state_is_refused(tmp_path, fresh_hydra, content):
    path = tmp_path / DIFFRATE_STATE
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="search.resume=.* is refused"):
        run(compose([*TASK, f"search.resume={path}"]), tmp_path / "run")
