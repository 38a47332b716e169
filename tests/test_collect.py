"""The results collector: one table and trade-off plots per protocol from many run records."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgb

from tokenreduce.engine.collect import (
    COLUMNS,
    collect,
    find_records,
    format_markdown,
    main,
    protocol_key,
    table_rows,
)
from tokenreduce.errors import ConfigError

MEASURE = {"batch_size": 8, "dtype": "float32", "autocast": None, "device": "cpu"}


def record(tmp: Path, name: str, reducer: str, params: dict, top1: float | None, ips: float | None,
           gmacs: float | None, model: str = "vit_x", finished: str = "2025-01-01T00:00:00", **fields) -> dict:
    """Write `tmp/name/result.json` as RunRecord writes it; `fields` replace any other field."""
    data = {"run_name": name, "task": "evaluate", "model": model, "weights": f"timm:{model}",
            "dataset": {"name": "imagenet"}, "split": "val", "reducer": reducer, "reducer_params": params,
            "top1": top1, "top5": None, "images_per_s": ips, "gmacs": gmacs, "tokens_out": 10,
            "finished": finished, "measure": dict(MEASURE), "output_dir": str(tmp / name), **fields}
    folder = tmp / name
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(data))
    return data


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    record(root, "0", "none", {}, 0.80, 100.0, 4.0)
    record(root, "1", "tome", {"r": 8, "mode": "wavg"}, 0.78, 150.0, 2.5)
    record(root, "2", "tome", {"r": 13, "mode": "wavg"}, 0.75, 200.0, 2.0)
    record(root, "3", "tome", {"r": 8}, 0.70, 50.0, 1.0, model="other")  # no baseline for this model
    return root


def test_rows_compare_against_the_baseline_of_the_same_model(sweep):
    rows = {r["run_name"]: r for r in table_rows(find_records([sweep]))}
    # MAC fraction: the run's GMACs over the baseline's (4.0), by hand
    assert rows["0"]["speedup"] == pytest.approx(1.0) and rows["0"]["mac_fraction"] == pytest.approx(1.0)
    assert rows["1"]["speedup"] == pytest.approx(1.5) and rows["1"]["mac_fraction"] == pytest.approx(0.625)
    assert rows["2"]["speedup"] == pytest.approx(2.0) and rows["2"]["mac_fraction"] == pytest.approx(0.5)
    assert rows["3"]["speedup"] is None and rows["3"]["mac_fraction"] is None and rows["3"]["baseline"] is None
    assert rows["1"]["params"] == "r=8"  # only what differs from the reducer's defaults
    markdown = format_markdown(list(rows.values()))
    assert markdown.splitlines()[0].startswith("| protocol | model | weights | task | reducer | params | top1")
    assert "| p1 | vit_x | timm:vit_x | evaluate | tome | r=13 | 0.7500 |" in markdown
    assert markdown.splitlines()[2].endswith(f"| {sweep / '0'} |")  # the baseline column


def test_collect_writes_table_and_plots(sweep, tmp_path):
    written = collect([sweep], tmp_path / "report")
    with open(written["csv"]) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS and "task" in COLUMNS and "weights" in COLUMNS
        assert [(r["protocol"], r["task"], r["weights"]) for r in reader] == [("p1", "evaluate", "timm:vit_x")] * 3 + [
            ("p2", "evaluate", "timm:other")]
    # two protocols: a pair of plots for each, named by its number
    plots = {f"{kind}_plot_p{n}" for kind in ("throughput", "macs") for n in (1, 2)}
    assert set(written) == {"csv", "markdown"} | plots
    for key in plots:
        data = written[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "accuracy_vs_macs_p1.png", "accuracy_vs_macs_p2.png", "accuracy_vs_throughput_p1.png",
        "accuracy_vs_throughput_p2.png", "results.csv", "results.md"]


def test_one_protocol_keeps_the_plain_plot_names(sweep, tmp_path):
    written = collect([sweep / "0", sweep / "1", sweep / "2"], tmp_path / "one")
    assert written["macs_plot"].name == "accuracy_vs_macs.png"
    assert written["throughput_plot"].name == "accuracy_vs_throughput.png"


def test_collect_without_plots(sweep, tmp_path):
    written = collect([sweep / "1" / "result.json", sweep / "2", sweep / "2"], tmp_path / "two", plots=False)
    assert set(written) == {"csv", "markdown"}
    with open(written["csv"]) as f:
        assert [r["run_name"] for r in csv.DictReader(f)] == ["1", "2"]  # a run named twice is one row


def test_command_line(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path / "cli"), "--no-plots"])
    out = capsys.readouterr().out
    assert "| p1 | vit_x | timm:vit_x | evaluate | none |" in out and (tmp_path / "cli" / "results.md").is_file()


# --- problem 1: bad input is one clear error naming the path ----------------------------------------------
@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "not an object"])
def test_bad_input_is_one_line_naming_the_path(tmp_path, capsys, case):
    path = tmp_path / "input"
    if case != "missing":
        path.mkdir()
    if case in ("corrupt", "not an object"):
        record(path, "0", "none", {}, 0.8, 100.0, 4.0)
        path = path / "0" / "result.json"
        path.write_text('{"top1": 0.8,' if case == "corrupt" else "[1, 2]")
    with pytest.raises(ConfigError) as err:
        collect([path], tmp_path / "out")
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == f"tokenreduce-collect: error: {message}\n" and captured.out == ""


@pytest.mark.parametrize("field, value", [("top1", 78.0), ("top5", -0.1), ("top1", "0.8")])
def test_an_accuracy_that_is_not_a_fraction_is_refused_naming_the_record(tmp_path, field, value):
    record(tmp_path, "0", "none", {}, 0.80, 100.0, 4.0)
    accuracies = {"top1": 0.78, "top5": None, field: value}
    record(tmp_path, "1", "tome", {"r": 8}, accuracies["top1"], 150.0, 2.5, top5=accuracies["top5"])
    with pytest.raises(ConfigError) as err:
        collect([tmp_path], tmp_path / "out")
    assert str(err.value) == (f"{tmp_path / '1' / 'result.json'}: {field}={value!r} is not an accuracy; allowed: a "
                              "fraction from 0 to 1, or null")
    assert not (tmp_path / "out").exists()


# --- problem 2: an earlier report is never overwritten -------------------------------------------------
def test_collect_refuses_an_existing_report_and_changes_nothing(sweep, tmp_path):
    out = tmp_path / "report"
    collect([sweep], out)
    before = snapshot(tmp_path)
    record(sweep, "4", "tome", {"r": 4}, 0.79, 120.0, 3.0)  # a new run: the new report would differ
    before[str(Path("sweep", "4", "result.json"))] = (sweep / "4" / "result.json").read_bytes()
    with pytest.raises(ConfigError, match=r"results\.csv.*pick another --out"):
        collect([sweep], out)
    assert snapshot(tmp_path) == before
    collect([sweep], tmp_path / "report2")  # another --out works
    assert snapshot(tmp_path / "report").keys() == snapshot(tmp_path / "report2").keys()


def test_default_out_is_the_first_path_and_a_second_collect_is_refused(sweep, capsys):
    main([str(sweep)])
    assert (sweep / "results.md").is_file() and (sweep / "accuracy_vs_macs_p1.png").is_file()
    capsys.readouterr()
    before = snapshot(sweep)
    with pytest.raises(SystemExit) as exit_:
        main([str(sweep)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenreduce-collect: error: ") and str(sweep / "results.csv") in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(sweep) == before


def test_a_single_existing_plot_is_enough_to_refuse_before_writing_anything(sweep, tmp_path):
    out = tmp_path / "run_dir"
    out.mkdir()
    (out / "accuracy_vs_macs_p1.png").write_bytes(b"an earlier plot")
    with pytest.raises(ConfigError, match="accuracy_vs_macs_p1.png"):
        collect([sweep], out)
    assert snapshot(out) == {"accuracy_vs_macs_p1.png": b"an earlier plot"}  # not even the table was written


# --- problem 3: ratios only within a protocol, against its newest baseline --------------------------
def test_two_protocols_each_compared_with_its_own_baseline(tmp_path):
    # off-the-shelf and fine-tuned ViT, each with a baseline and tome r=2, in one folder
    record(tmp_path, "a0", "none", {}, 0.80, 100.0, 4.0, finished="2025-01-01T00:00:01")
    record(tmp_path, "a1", "tome", {"r": 2}, 0.79, 150.0, 3.2, finished="2025-01-01T00:00:02")
    record(tmp_path, "b0", "none", {}, 0.82, 203.0, 4.0, finished="2025-01-01T00:00:03", task="finetune",
           weights="file:ft.ckpt")
    record(tmp_path, "b1", "tome", {"r": 2}, 0.81, 250.0, 3.2, finished="2025-01-01T00:00:04", task="finetune",
           weights="file:ft.ckpt")
    rows = {r["run_name"]: r for r in table_rows(find_records([tmp_path]))}
    expected = {  # run: (protocol, speedup, mac_fraction, baseline)
        "a0": ("p1", 1.0, 1.0, "a0"), "a1": ("p1", 1.5, 0.8, "a0"),
        "b0": ("p2", 1.0, 1.0, "b0"), "b1": ("p2", 250 / 203, 0.8, "b0"),
    }
    for name, (protocol, speedup, mac_fraction, baseline) in expected.items():
        row = rows[name]
        assert row["speedup"] == pytest.approx(speedup) and row["mac_fraction"] == pytest.approx(mac_fraction)
        assert (row["protocol"], row["baseline"]) == (protocol, str(tmp_path / baseline))
    assert (rows["b1"]["task"], rows["b1"]["weights"]) == ("finetune", "file:ft.ckpt")


@pytest.mark.parametrize("change", [
    {"weights": "file:ft.ckpt"}, {"task": "finetune"}, {"model": "vit_y"}, {"dataset": {"name": "cifar100"}},
    {"split": "test"}, {"measure": {**MEASURE, "dtype": "bfloat16"}}, {"measure": {**MEASURE, "autocast": "float16"}},
    {"measure": {**MEASURE, "batch_size": 64}}, {"measure": {**MEASURE, "device": "cuda"}},
])
def test_any_protocol_field_separates_runs(tmp_path, change):
    base = record(tmp_path, "0", "none", {}, 0.80, 100.0, 4.0)
    other = record(tmp_path, "1", "tome", {"r": 2}, 0.79, 150.0, 3.2, **change)
    rows = {r["run_name"]: r for r in table_rows(find_records([tmp_path]))}
    assert rows["1"]["speedup"] is None and rows["1"]["mac_fraction"] is None
    assert rows["1"]["protocol"] == "p2" and rows["1"]["baseline"] is None
    assert protocol_key(base) != protocol_key(other)


def test_several_baselines_use_the_newest_and_say_so(tmp_path):
    record(tmp_path, "old", "none", {}, 0.80, 100.0, 4.0, finished="2025-01-01T00:00:01")
    record(tmp_path, "tome", "tome", {"r": 8}, 0.78, 300.0, 2.0, finished="2025-01-01T00:00:02")
    record(tmp_path, "new", "none", {}, 0.80, 200.0, 4.0, finished="2025-01-01T00:00:03")
    rows = {r["run_name"]: r for r in table_rows(find_records([tmp_path]))}
    assert rows["tome"]["speedup"] == pytest.approx(1.5) and rows["tome"]["mac_fraction"] == pytest.approx(0.5)
    for name in ("old", "new"):  # never one baseline against the other (old would read 0.5x)
        assert rows[name]["speedup"] == 1.0
        assert rows[name]["baseline"] == str(tmp_path / name)
    assert rows["tome"]["baseline"] == str(tmp_path / "new")
    written = collect([tmp_path], tmp_path / "report")
    assert f"ratios against the newest of its 2 baselines, {tmp_path / 'new'}" in written["markdown"].read_text()


def test_runs_not_finished_are_skipped_and_counted(tmp_path, caplog):
    record(tmp_path, "0", "none", {}, 0.80, 100.0, 4.0)
    record(tmp_path, "1", "tome", {"r": 8}, 0.78, 150.0, 2.5, status="finished")
    record(tmp_path, "2", "tome", {"r": 13}, None, None, None, status="failed")
    record(tmp_path, "3", "tome", {"r": 16}, 0.5, 900.0, 1.0, status="running")
    with caplog.at_level(logging.WARNING, logger="tokenreduce.engine.collect"):
        records = find_records([tmp_path])
    assert [r["run_name"] for r in records] == ["0", "1"]
    assert "skipped 2 run(s)" in caplog.text and str(tmp_path / "3") in caplog.text
    with pytest.raises(ConfigError, match="no finished run"):
        collect([tmp_path / "2", tmp_path / "3"], tmp_path / "out")


# --- problem 4: the plots come from tokenreduce.viz, one protocol each, lines in strength order ----------
@pytest.fixture
def figures(monkeypatch) -> dict:
    """The figures collect draws, by file name."""
    from tokenreduce import viz

    drawn, real = {}, viz.plot_tradeoff

    def spy(rows, x, path=None, **kwargs):
        drawn[Path(path).name] = real(rows, x, path, **kwargs)
        return drawn[Path(path).name]

    monkeypatch.setattr(viz, "plot_tradeoff", spy)
    return drawn


def test_plot_lines_follow_strength_with_one_protocol_per_figure(tmp_path, figures):
    runs = [  # name, reducer, params, top1, images/s, GMACs; finished in this order (not strength order)
        ("base", "none", {}, 0.80, 100.0, 4.0),
        ("t2", "tome", {"r": 2}, 0.79, 130.0, 3.6), ("t8", "tome", {"r": 8}, 0.76, 190.0, 2.4),
        ("t4", "tome", {"r": 4}, 0.78, 125.0, 3.2),  # timing noise: slower than r=2
        ("e9", "evit", {"ratio": 0.9}, 0.79, 110.0, 3.6), ("e5", "evit", {"ratio": 0.5}, 0.70, 200.0, 2.0),
        ("e7", "evit", {"ratio": 0.7}, 0.75, 140.0, 2.8),
        ("p8", "tome", {"r": 8, "prop_attn": False}, 0.75, 185.0, 2.4),
        ("m2", "mystery", {"k": 2}, 0.72, 160.0, 3.0), ("m1", "mystery", {"k": 1}, 0.71, 150.0, 2.0),
    ]
    for i, (name, reducer, params, top1, ips, gmacs) in enumerate(runs):
        record(tmp_path, name, reducer, params, top1, ips, gmacs, finished=f"2025-01-01T00:00:{i:02d}")
    ft = {"task": "finetune", "weights": "file:ft.ckpt"}
    record(tmp_path, "ft0", "none", {}, 0.83, 90.0, 4.0, finished="2025-01-02", **ft)
    record(tmp_path, "ft1", "tome", {"r": 8}, 0.81, 180.0, 2.4, finished="2025-01-03", **ft)
    record(tmp_path, "nobase", "tome", {"r": 8}, 0.5, 1.0, 1.0, finished="2025-01-04", split="test")
    written = collect([tmp_path], tmp_path / "report")
    assert sorted(figures) == [f"accuracy_vs_{kind}_p{n}.png" for kind in ("macs", "throughput") for n in (1, 2, 3)]
    assert {written[f"{k}_plot_p{n}"].name for k in ("macs", "throughput") for n in (1, 2, 3)} == set(figures)

    ax = figures["accuracy_vs_throughput_p1.png"].axes[0]
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    order = {  # strongest first: r descending, ratio ascending; an unknown reducer by MACs ascending
        "tome": ["t8", "t4", "t2"], "evit": ["e5", "e7", "e9"], "tome prop_attn=False": ["p8"], "mystery": ["m1", "m2"]}
    assert set(lines) == set(order)
    by_name = {name: (ips, top1) for name, _, _, top1, ips, _ in runs}
    for method, names in order.items():
        assert list(lines[method].get_xdata()) == pytest.approx([by_name[n][0] for n in names])
        assert list(lines[method].get_ydata()) == pytest.approx([by_name[n][1] for n in names])
    assert list(lines["tome"].get_xdata()) != sorted(lines["tome"].get_xdata())  # not in x order
    assert len({line.get_color() for line in lines.values()}) == len(lines)
    assert len({line.get_marker() for line in lines.values()}) == len(lines)
    stars = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(stars) == 1 and np.allclose(stars[0].get_offsets(), [[100.0, 0.80]])
    assert np.allclose(stars[0].get_facecolor()[0][:3], 0.0)
    assert all(to_rgb(line.get_color()) != (0.0, 0.0, 0.0) for line in lines.values())  # black is the baseline's
    assert stars[0].get_zorder() > max(line.get_zorder() for line in ax.lines)
    labels = [t.get_window_extent() for t in ax.texts]
    assert labels and not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])

    ax2 = figures["accuracy_vs_macs_p2.png"].axes[0]  # the fine-tuned protocol: its own baseline only
    star = [c for c in ax2.collections if isinstance(c, PathCollection)][0]
    assert np.allclose(star.get_offsets(), [[4.0, 0.83]])
    assert [list(line.get_xdata()) for line in ax2.lines if line.get_label() == "tome"] == [[2.4]]
    assert "p2: vit_x (file:ft.ckpt), finetune" in ax2.get_title()
    ax3 = figures["accuracy_vs_macs_p3.png"].axes[0]  # no baseline: its one run, no star
    assert not [c for c in ax3.collections if isinstance(c, PathCollection)] and "imagenet test" in ax3.get_title()


# --- the Hydra callback ---------------------------------------------------------------------------------
def test_multirun_end_collects_into_the_fresh_sweep_dir(sweep, capsys):
    from omegaconf import OmegaConf

    from tokenreduce.engine.hydra_callbacks import CollectOnMultirunEnd

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    runs = snapshot(sweep)
    CollectOnMultirunEnd().on_multirun_end(config)
    assert f"collected the runs of {sweep}" in capsys.readouterr().out
    after = snapshot(sweep)
    assert {k: after[k] for k in runs} == runs  # the runs' own files are untouched
    assert set(after) - set(runs) == {"results.csv", "results.md", "accuracy_vs_macs_p1.png", "accuracy_vs_macs_p2.png",
                                      "accuracy_vs_throughput_p1.png", "accuracy_vs_throughput_p2.png"}
    CollectOnMultirunEnd().on_multirun_end(config)  # again: refused with a message, nothing raised or changed
    assert "results not collected" in capsys.readouterr().err and snapshot(sweep) == after


def test_adapter_options_name_the_method_and_share_the_baseline(tmp_path):
    """A model family's option (where merged tokens take their position) is part of the method, not
    of the protocol: its runs are compared with the same baseline and drawn as their own line."""
    record(tmp_path, "base", "none", {}, 0.80, 100.0, 4.0, finished="2025-01-01T00:00:00")
    record(tmp_path, "dest", "tome", {"r": 8}, 0.78, 150.0, 2.5, finished="2025-01-01T00:00:01")
    record(tmp_path, "mean", "tome", {"r": 8}, 0.77, 150.0, 2.5, finished="2025-01-01T00:00:02",
           adapter_options={"merged_position": "mean"})
    rows = {r["run_name"]: r for r in table_rows(find_records([tmp_path]))}
    assert rows["dest"]["params"] == "r=8" and rows["mean"]["params"] == "r=8 merged_position=mean"
    assert rows["mean"]["baseline"] == rows["dest"]["baseline"] == str(tmp_path / "base")
    assert rows["mean"]["method"] == "tome merged_position=mean" and rows["dest"]["method"] == "tome"


# --- the data in the protocol: its root, subset and image count ------------------------------------------
def imagenet(root: str, images: int) -> dict:
    return {"name": "imagenet", "root": root, "splits": {"train": "train", "val": "val", "test": "val"},
            "num_classes": 1000, "images": {"val": images}}


@pytest.mark.parametrize("other, words", [
    (imagenet("/data/imagenet-v2", 50000), "root=/data/imagenet-v2"),  # another folder
    (imagenet("/data/imagenet", 500), "val, 500 images"),  # a subset of the same folder
])
def test_runs_on_other_data_are_another_protocol_with_its_own_baseline(tmp_path, other, words):
    record(tmp_path, "a0", "none", {}, 0.80, 100.0, 4.0, dataset=imagenet("/data/imagenet", 50000),
           finished="2025-01-01T00:00:01")
    record(tmp_path, "a1", "tome", {"r": 2}, 0.79, 150.0, 3.2, dataset=imagenet("/data/imagenet", 50000),
           finished="2025-01-01T00:00:02")
    record(tmp_path, "b0", "none", {}, 0.70, 120.0, 4.0, dataset=other, finished="2025-01-01T00:00:03")
    record(tmp_path, "b1", "tome", {"r": 2}, 0.69, 180.0, 3.2, dataset=other, finished="2025-01-01T00:00:04")
    rows = {r["run_name"]: r for r in table_rows(find_records([tmp_path]))}
    assert [rows[n]["protocol"] for n in ("a0", "a1", "b0", "b1")] == ["p1", "p1", "p2", "p2"]
    assert rows["a1"]["baseline"] == str(tmp_path / "a0") and rows["a1"]["speedup"] == pytest.approx(1.5)
    assert rows["b1"]["baseline"] == str(tmp_path / "b0") and rows["b1"]["speedup"] == pytest.approx(1.5)
    notes = [x for x in collect([tmp_path], tmp_path / "report", plots=False)["markdown"].read_text().splitlines()
             if x.startswith("- p")]
    assert notes[0].startswith("- p1: vit_x (timm:vit_x), evaluate on imagenet val, 50000 images; data: "
                               "root=/data/imagenet splits=train:train,val:val,test:val num_classes=1000; measured: ")
    assert words in notes[1] and words not in notes[0]


def test_data_modules_describe_their_resolved_root_and_evaluated_images(tmp_path, monkeypatch):
    import timm
    from test_data import make_folder
    from test_fashion_mnist import tiny_dataset

    from tokenreduce.data import FashionMNISTDataModule, ImageFolderDataModule, SyntheticDataModule

    make_folder(tmp_path / "folder")
    monkeypatch.chdir(tmp_path)
    model = timm.create_model("test_vit", img_size=32, num_classes=2)
    folder = ImageFolderDataModule(root="folder/../folder", num_workers=0)  # one folder, whatever its spelling
    folder.bind_model(model)
    assert folder.describe()["root"] == str((tmp_path / "folder").resolve()) and folder.describe()["images"] == {}
    folder.setup("validate")
    assert folder.describe()["images"] == {"val": 6}

    tiny_dataset(tmp_path / "fm", test=6)
    fashion = FashionMNISTDataModule(root="fm", val_size=2, test_samples=5)
    fashion.bind_model(timm.create_model("test_vit", img_size=32, num_classes=10))
    fashion.setup("test")
    described = fashion.describe()
    assert described["root"] == str((tmp_path / "fm").resolve()) and described["images"] == {"val": 2, "test": 5}

    synthetic = SyntheticDataModule(val_samples=5, seed=3, signal=0.5, num_classes=2, input_size=(3, 8, 8))
    synthetic.setup("validate")
    assert {k: synthetic.describe()[k] for k in ("seed", "signal", "images")} == {
        "seed": 3, "signal": 0.5, "images": {"val": 5, "test": 5}}


def test_evaluations_of_different_image_counts_are_not_compared(tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    from tokenreduce.engine.config import compose
    from tokenreduce.engine.run import run

    small = ["experiment=smoke", "trainer.enable_progress_bar=false", "data.train_samples=8", "data.batch_size=4",
             "measure.warmup=0", "measure.repeats=1"]
    for name, reducer, images in (("a", ["reducer=none"], 4), ("b", [], 4), ("c", [], 8)):
        GlobalHydra.instance().clear()
        run(compose([*small, *reducer, f"data.val_samples={images}"]), tmp_path / name)
    GlobalHydra.instance().clear()
    rows = {Path(r["output_dir"]).name: r for r in table_rows(find_records([tmp_path]))}
    assert (rows["a"]["images"], rows["b"]["images"], rows["c"]["images"]) == (4, 4, 8)
    assert rows["b"]["protocol"] == "p1" and rows["b"]["baseline"] == str(tmp_path / "a")
    assert rows["c"]["protocol"] == "p2" and rows["c"]["baseline"] is None and rows["c"]["speedup"] is None


# --- timing marks: unsteady rounds, a loaded machine, speed-ups across processes -------------------------
def test_speedups_across_processes_and_doubtful_timings_are_marked(tmp_path):
    steady = {**MEASURE, "spread": 0.02, "load_before": 0.5, "load_after": 1.0, "cores": 2}
    record(tmp_path, "0", "none", {}, 0.80, 100.0, 4.0, measure=steady, finished="2025-01-01T00:00:01")
    record(tmp_path, "1", "tome", {"r": 8}, 0.78, 150.0, 2.5, measure=steady, finished="2025-01-01T00:00:02")
    record(tmp_path, "2", "tome", {"r": 13}, 0.75, 40.0, 2.0, measure={**steady, "spread": 0.4, "load_after": 3.5},
           finished="2025-01-01T00:00:03")
    written = collect([tmp_path], tmp_path / "report", plots=False)
    lines = written["markdown"].read_text().splitlines()
    by_params = {line.split(" | ")[5]: line.split(" | ")[8:10] for line in lines[2:5]}  # images/s, speedup
    assert by_params == {"-": ["100.0", "1.00x"], "r=8": ["150.0", "1.50x *"], "r=13": ["40.0 ~!", "0.40x ~!*"]}
    assert lines[-1].startswith("Marks: ~ the timing rounds disagree") and "* a speed-up across processes" in lines[-1]
    with open(written["csv"]) as f:
        rows = {r["run_name"]: r for r in csv.DictReader(f)}
    assert float(rows["2"]["speedup"]) == pytest.approx(0.4)  # the number itself stays a number
    assert [(rows[n]["timing_marks"], rows[n]["speedup_marks"]) for n in "012"] == [("", ""), ("", "*"), ("~!", "~!*")]
    assert (float(rows["2"]["spread"]), float(rows["2"]["load_after"]), rows["2"]["cores"]) == (0.4, 3.5, "2")


def test_a_speedup_over_an_unsteady_baseline_carries_its_marks(tmp_path):
    record(tmp_path, "0", "none", {}, 0.80, 100.0, 4.0, measure={**MEASURE, "spread": 0.5},
           finished="2025-01-01T00:00:01")
    record(tmp_path, "1", "tome", {"r": 8}, 0.78, 150.0, 2.5, finished="2025-01-01T00:00:02")  # an older record
    rows = {r["run_name"]: r for r in table_rows(find_records([tmp_path]))}
    assert (rows["0"]["timing_marks"], rows["0"]["speedup_marks"]) == ("~", "~")  # against itself: not across
    assert (rows["1"]["timing_marks"], rows["1"]["speedup_marks"]) == ("", "~*")


def test_a_transformers_task_protocol_names_its_split_and_resolved_folders(tmp_path, monkeypatch):
    from tokenreduce.data.hf_sets import CaptionSet
    from tokenreduce.engine.hf_tasks import _describe

    monkeypatch.chdir(tmp_path)
    captions = CaptionSet([Path("a.jpg")], ["a dog"], [0], [[0]])
    data = {"name": "flickr30k", "root": "images", "annotations": "ann.json", "split": "val"}
    assert _describe(data, captions) == (f"flickr30k val {tmp_path.resolve() / 'images'} "
                                         f"{tmp_path.resolve() / 'ann.json'} (1 images, 1 captions)")
    # the same annotations with other images, or another split of the same count, are other data
    assert len({_describe(data, captions), _describe({**data, "root": "other"}, captions),
                _describe({**data, "split": "test"}, captions)}) == 3
