"""The scripts in experiments/ that reproduce published tables."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """experiments/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_macs_table():
    return load_script("macs_table")


@pytest.mark.parametrize("index", [i for i, row in enumerate(load_macs_table().ROWS) if row[4] is not None])
def test_published_gmacs_are_reproduced(index):
    table = load_macs_table()
    model_name, _, reducer, params, published = table.ROWS[index]
    gmacs, _ = table.measure(model_name, reducer, params)
    decimals = len(published.partition(".")[2])  # papers print one or two decimals
    assert gmacs == pytest.approx(float(published), abs=1.5 * 10**-decimals)


@pytest.mark.parametrize("page", sorted((ROOT / "docs" / "reducers").glob("*.md")), ids=lambda p: p.stem)
def test_reducer_pages_quote_the_published_gmacs_of_the_table(page):
    """The table's published figures are the one record: a page's "Published numbers" quotes exactly
    the figures the table holds for its reducer, as printed."""
    section = page.read_text().partition("## Published numbers")[2].split("\n## ")[0]
    quoted = sorted(re.findall(r"(\d+\.\d+) GMACs", section))
    table = sorted(row[4] for row in load_macs_table().ROWS if row[2] == page.stem and row[4] is not None)
    assert quoted == table


def test_the_table_prints_every_row(capsys):
    table = load_macs_table()
    table.ROWS = table.ROWS[:2]
    table.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "MCTF r=16" in lines[2] and "0.71" in lines[2]


def test_the_attention_kernel_comparison_times_each_kernel_and_checks_its_output():
    module = load_script("attention_kernels")
    rows = module.measure("test_vit", r=4, batch=1, rounds=1, device="cpu", dtype="float32", compile_=False)
    assert [row["kernel"] for row in rows] == ["mask", "channel", "flex"] and rows[0]["vs_mask"] == 1
    assert all(row["images_per_s"] > 0 and row["max_diff"] < 1e-4 for row in rows)


def test_the_gpu_script_runs_its_smoke_mode_and_writes_its_table(tmp_path):
    module = load_script("gpu_speed")
    assert module.main(["--out", str(tmp_path), "--smoke", "--no-tests", "--batches", "1", "2", "--rounds", "1",
                        "--r", "4", "--compile-batches"]) == 0
    rows = json.loads((tmp_path / "gpu_speed.json").read_text())["rows"]
    assert [(row["batch"], row["compiled"]) for row in rows] == [(1, False), (2, False)]
    for row in rows:
        assert set(row["speedup"]) == {"unreduced", "ours", "blocks", "limit"} and row["speedup"]["unreduced"] == 1
        assert row["blocks_max_diff"] < 1e-4  # the blocks-patching ToMe computes what ours does
    assert "| test_vit | 2 | False |" in (tmp_path / "gpu_speed.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_gpu_script_refuses_cuda_without_a_gpu_and_names_the_alternatives(tmp_path, capsys):
    module = load_script("gpu_speed")
    assert module.main(["--out", str(tmp_path), "--no-tests"]) == 2
    message = capsys.readouterr().err
    assert "--device cuda" in message and "--device cpu" in message and "--smoke" in message
    assert not (tmp_path / "gpu_speed.json").exists()
