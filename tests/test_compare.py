"""task=compare (the quickstart): every reducer at matched MACs beside the baseline, written to a run dir."""

from __future__ import annotations

import csv
import json

import pytest
from test_fashion_mnist import tiny_dataset

from tokenreduce.engine.compare import CSV_COLUMNS, MERGE_MAPS, PLOT_MACS, PLOT_SPEED, settings_from
from tokenreduce.engine.config import compose
from tokenreduce.engine.run import run
from tokenreduce.errors import ConfigError

pytestmark = pytest.mark.usefixtures("clean_hydra")


def small(root, *overrides):
    return compose([f"data.root={root}", "compare.images=5", "data.eval_batch_size=4", "model.pretrained=false",
                    "compare.reducers=[tome,evit,mctf]", "measure.batch_size=2", "measure.warmup=0",
                    "measure.repeats=2", "compare.merge_maps=2", *overrides])


def test_no_arguments_run_the_quickstart():
    cfg = compose([])
    assert cfg.task == "compare" and cfg.model.name == "fmnist_vit" and cfg.model.pretrained
    assert cfg.data.name == "fashion_mnist" and cfg.eval_split == "test" and cfg.compare.images >= 2000
    settings = settings_from(cfg)
    assert set(settings.reducers) == {"tome", "pitome", "tofu", "mctf", "mstm", "evit", "topk", "norm", "random", "atc",
                                      "ppt", "zerotprune"}
    assert settings.mac_fractions == [0.75, 0.5]
    assert settings.reducers["mstm"] == {"fusion": False, "layers": [2, 4, 6]}


def test_compare_writes_table_plots_and_maps(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "fm")
    out = tmp_path / "run"
    run(small(root), out)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"results: {out}"
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["reducer"] for r in rows] == ["none", "tome", "tome", "evit", "evit", "mctf", "mctf"]
    assert float(rows[0]["mac_fraction"]) == 1.0 and float(rows[0]["speedup"]) == 1.0
    assert int(rows[0]["tokens"]) == 65
    for row, target in zip(rows[1:], [0.75, 0.5] * 3, strict=True):
        assert abs(float(row["mac_fraction"]) - target) <= 0.02 * target
        assert 0 <= float(row["top1"]) <= 1 and int(row["tokens"]) < 65
        assert json.loads(row["params"])
    assert json.loads(rows[3]["params"])["layers"] == [2, 4, 6]  # the quickstart's fixed staged layers
    record = json.loads((out / "comparison.json").read_text())
    assert record["protocol"]["images"] == 5 and record["protocol"]["weights"] == "random"
    assert record["protocol"]["adapter_options"] == {}
    assert len(record["rows"]) == 7
    # every timing with its rounds' spread and the machine's load; the table with its marks' legend
    assert set(record["protocol"]["load"]) == {"load_before", "load_after", "cores", "threads"}
    assert all(row["spread"] >= 0 and row["marks"] in ("", "~", "!", "~!") for row in record["rows"])
    table = (out / "table.md").read_text().splitlines()
    assert f"fashion_mnist test images in {root.resolve()}; " in table[0] and "load average" in table[0]
    assert table[-1].startswith("Timing marks: ~ the timing rounds disagree") and table[-1] in printed
    for name in ("table.md", PLOT_MACS, PLOT_SPEED, MERGE_MAPS):
        assert (out / name).stat().st_size > 0
    # top-1 and its change as fractions with 4 decimals, speed-ups as ratios
    assert table[2] == "| reducer | params | MAC fraction | top-1 | change | images/s vs baseline | tokens out |"
    cells = [line.split(" | ") for line in table[4:11]]
    assert [c[3] for c in cells] == [f"{float(r['top1']):.4f}" for r in rows]
    assert [c[4] for c in cells[1:]] == [f"{float(r['top1']) - float(rows[0]['top1']):+.4f}" for r in rows[1:]]
    assert [c[5].split()[0] for c in cells] == [f"{float(r['speedup']):.2f}x" for r in rows]
    # each row printed as its top-1 is measured (its speed-up not yet timed), before the whole table
    early = [line for line in printed if line.startswith("| ") and line.split(" | ")[5] == "-"]
    assert early == [line.rsplit(" | ", 2)[0] + f" | - | {line.rsplit(' | ', 1)[1]}"
                     for line in table[4:11]]
    assert printed.index(early[-1]) < printed.index(table[4])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="already holds"):
        run(small(root), out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("override, message", [
    ("compare.reducers=[tome,dynamicvit]", "dynamicvit has no strength parameter"),
    ("compare.reducers=[tome,nope]", "reducer='nope' is not registered"),
    ("+compare.fixed.tome.ratio=0.9", "compare.fixed.tome.ratio=0.9: ratio is set by the MAC matching"),
    ("+compare.fixed.tome.bogus=1", "tome: unknown parameter"),
    ("compare.mac_fractions=[1.5]", "mac_fractions=1.5 is invalid"),
    ("compare.merge_map_fraction=0.3", "merge_map_fraction=0.3 is not one of"),
    ("+compare.colour=red", "compare.colour is not a setting"),
    ("compare.images=0", "images=0 is invalid"),
])
def test_bad_settings_fail_before_any_run_directory_content(tmp_path, override, message):
    root = tiny_dataset(tmp_path / "fm")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        run(small(root, override), out)
    assert not out.exists() or not any(out.iterdir())


def test_missing_dataset_fails_first(tmp_path):
    with pytest.raises(ConfigError, match="data.root=.*nowhere: no such folder"):
        run(small(tmp_path / "nowhere"), tmp_path / "run")
