"""The measurement code behind `make bench` and `make run`."""

import pytest
import torch
from conftest import images_for, make_model

import tokenreduce
from tokenreduce.bench import demo
from tokenreduce.bench.__main__ import main as bench_main
from tokenreduce.bench.harness import Case, format_rows, peak_memory_mb, reducer_share, run
from tokenreduce.engine.speed import throughput, time_forward


class CountingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_time_forward_runs_warmup_then_repeats():
    model = CountingModel()
    times = time_forward(model, torch.zeros(4, 1), repeats=3, warmup=2)
    assert model.calls == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_throughput_is_batch_over_median_time():
    timing = throughput(CountingModel(), torch.zeros(8, 1), repeats=3, warmup=0)
    median = sorted(timing.seconds_per_batch)[1]
    assert timing.images_per_s == pytest.approx(8 / median)
    assert (timing.batch_size, timing.dtype, timing.device) == (8, "float32", "cpu")


def test_reducer_share_is_a_fraction_and_zero_without_reduction():
    model = tokenreduce.apply(make_model("test_vit"), "tome", r=10)
    x = images_for(model)
    share = reducer_share(model, x)
    assert 0 < share < 1
    tokenreduce.apply(model, "none")
    assert reducer_share(model, x) == 0


def test_run_compares_every_case_with_the_baseline():
    rows = run("test_vit", [Case("tome r=10", "tome", {"r": 10})], batch=2, img_size=160, rounds=2, memory=False)
    base, tome = rows
    assert base["case"] == "baseline" and base["speedup"] == 1 and base["mac_ratio"] == 1
    assert tome["tokens_out"] == 101 - 6 * 10 and tome["mac_ratio"] > 1
    assert tome["speedup"] == pytest.approx(tome["images_per_s"] / base["images_per_s"])
    assert tome["of_ideal"] == pytest.approx(tome["speedup"] / tome["mac_ratio"])
    table = format_rows(rows)
    assert "tome r=10" in table and "baseline" in table and table.count("\n") == 3


@pytest.mark.slow
def test_peak_memory_is_measured_in_a_fresh_process():
    peak = peak_memory_mb("test_vit", Case("tome", "tome", {"r": 4}), 2, 160, "float32", "cpu")
    assert 0 <= peak < 2000


def test_bench_and_demo_entry_points(capsys, tmp_path):
    out = tmp_path / "rows.json"
    bench_main(["--suite", "tome", "--model", "test_vit", "--batch", "1", "--img-size", "160",
                "--rounds", "1", "--no-memory", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "tome r=13" in printed and out.exists()
    demo.main(["--model", "test_vit", "--batch", "1", "--rounds", "1"])
    printed = capsys.readouterr().out
    assert "tome r=16" in printed and "[197, 181, 165, 149, 133, 117, 101]" in printed


def test_images_per_second_uses_the_median():
    from tokenreduce.engine.speed import images_per_second

    assert images_per_second(8, [0.5, 4.0, 1.0]) == 8.0 and images_per_second(2, [0.25]) == 8.0
