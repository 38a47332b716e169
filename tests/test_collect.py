"""The results collector: one table and two trade-off plots from many run records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tokenreduce.engine.collect import collect, find_records, format_markdown, main, table_rows


def record(tmp: Path, name: str, reducer: str, params: dict, top1: float, ips: float, gmacs: float,
           model: str = "vit_x", finished: str = "2025-01-01T00:00:00") -> dict:
    data = {"run_name": name, "task": "evaluate", "model": model, "dataset": {"name": "imagenet"}, "split": "val",
            "reducer": reducer, "reducer_params": params, "top1": top1, "top5": None, "images_per_s": ips,
            "gmacs": gmacs, "tokens_out": 10, "finished": finished,
            "measure": {"batch_size": 8, "dtype": "float32", "autocast": None, "device": "cpu"}}
    folder = tmp / name
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(data))
    return data


@pytest.fixture
def sweep(tmp_path) -> Path:
    record(tmp_path, "0", "none", {}, 0.80, 100.0, 4.0)
    record(tmp_path, "1", "tome", {"r": 8, "mode": "wavg"}, 0.78, 150.0, 2.5)
    record(tmp_path, "2", "tome", {"r": 13, "mode": "wavg"}, 0.75, 200.0, 2.0)
    record(tmp_path, "3", "tome", {"r": 8}, 0.70, 50.0, 1.0, model="other")  # no baseline for this model
    return tmp_path


def test_rows_compare_against_the_baseline_of_the_same_model(sweep):
    rows = {r["run_name"]: r for r in table_rows(find_records([sweep]))}
    assert rows["0"]["speedup"] == pytest.approx(1.0) and rows["0"]["mac_ratio"] == pytest.approx(1.0)
    assert rows["1"]["speedup"] == pytest.approx(1.5) and rows["1"]["mac_ratio"] == pytest.approx(4.0 / 2.5)
    assert rows["2"]["speedup"] == pytest.approx(2.0) and rows["2"]["mac_ratio"] == pytest.approx(2.0)
    assert rows["3"]["speedup"] is None and rows["3"]["mac_ratio"] is None
    assert rows["1"]["params"] == "r=8"  # only what differs from the reducer's defaults
    markdown = format_markdown(list(rows.values()))
    assert markdown.splitlines()[0].startswith("| model | reducer | params | top1")
    assert "| vit_x | tome | r=13 | 0.7500 |" in markdown


def test_collect_writes_table_and_plots(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    written = collect([sweep], tmp_path / "report")
    with open(written["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 4
    for key in ("throughput_plot", "macs_plot"):
        data = written[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_collect_without_plots_and_without_records(sweep, tmp_path):
    written = collect([sweep / "1" / "result.json", sweep / "2"], tmp_path / "two", plots=False)
    assert set(written) == {"csv", "markdown"}
    with open(written["csv"]) as f:
        assert [r["run_name"] for r in csv.DictReader(f)] == ["1", "2"]
    with pytest.raises(FileNotFoundError, match="no result.json"):
        collect([tmp_path / "empty"], tmp_path / "out")


def test_command_line(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path / "cli"), "--no-plots"])
    out = capsys.readouterr().out
    assert "| vit_x | none |" in out and (tmp_path / "cli" / "results.md").is_file()
