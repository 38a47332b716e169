"""The measurement code behind `make bench` and `make run`."""

import pytest
import torch
from conftest import counted_flops, images_for, make_model
from test_invariants import SETTINGS as INVARIANT_SETTINGS

import tokenreduce
from tokenreduce.adapters.timm_vit import block_costs
from tokenreduce.bench import demo
from tokenreduce.bench.__main__ import main as bench_main
from tokenreduce.bench.harness import (
    Case,
    build,
    compiled_models,
    format_rows,
    peak_memory_mb,
    reducer_share,
    run,
)
from tokenreduce.engine.speed import (
    compiling_many,
    interleaved_model_times,
    interleaved_times,
    throughput,
    time_forward,
)
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import create_reducer
from tokenreduce.reducers.limit import SpeedLimit


class CallProbe(torch.nn.Module):
    """Records its name in `calls` (a list it may share with other probes) at every pass."""

    def __init__(self, name="model", calls=None):
        super().__init__()
        self.name, self.calls = name, [] if calls is None else calls

    def forward(self, x):
        self.calls.append(self.name)
        return x


def test_time_forward_runs_warmup_then_repeats():
    model = CallProbe()
    times = time_forward(model, torch.zeros(4, 1), repeats=3, warmup=2)
    assert len(model.calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_interleaved_model_times_warm_each_up_then_take_turns():
    calls = []
    models = [CallProbe("a", calls), CallProbe("b", calls)]
    times = interleaved_model_times(models, torch.zeros(1), warmup=2, rounds=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(t) for t in times] == [3, 3] and all(t >= 0 for row in times for t in row)


def test_compiling_many_allows_a_compilation_per_model_and_restores_the_limit():
    before = torch._dynamo.config.recompile_limit
    with compiling_many(30):
        assert torch._dynamo.config.recompile_limit >= 30
        assert torch._dynamo.config.accumulated_recompile_limit >= 30
    assert torch._dynamo.config.recompile_limit == before


def test_interleaved_times_place_each_reducer_before_its_own_passes():
    model = make_model("test_vit")
    reducers = [create_reducer("none"), create_reducer("tome", r=4)]
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tokenreduce.reducer_of(m)))
    times = interleaved_times(model, reducers, images_for(model)[:1], warmup=1, rounds=2)
    assert seen == reducers + reducers * 2 and [len(t) for t in times] == [2, 2]


def test_throughput_is_batch_over_median_time():
    timing = throughput(CallProbe(), torch.zeros(8, 1), repeats=3, warmup=0)
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


def test_the_reduce_scope_is_opened_only_while_a_profiler_records():
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile, record_function

    from tokenreduce.reducers.base import reduce_scope

    assert isinstance(reduce_scope(), nullcontext)
    with profile(activities=[ProfilerActivity.CPU]):
        assert isinstance(reduce_scope(), record_function)


def test_run_compares_every_case_with_the_baseline():
    rows = run("test_vit", [Case("tome r=10", "tome", {"r": 10})], batch=2, img_size=160, rounds=2, memory=False)
    base, tome = rows
    assert base["case"] == "baseline" and base["speedup"] == 1 and base["mac_fraction"] == 1
    assert tome["tokens_out"] == 101 - 6 * 10 and 0 < tome["mac_fraction"] < 1
    assert tome["mac_fraction"] == pytest.approx(tome["gmacs"] / base["gmacs"])
    assert tome["speedup"] == pytest.approx(tome["images_per_s"] / base["images_per_s"])
    assert tome["of_ideal"] == pytest.approx(tome["speedup"] * tome["mac_fraction"])
    assert base["limit_speedup"] == 1 and base["of_limit"] == 1
    assert tome["of_limit"] == pytest.approx(tome["speedup"] / tome["limit_speedup"]) and tome["limit_speedup"] > 0
    table = format_rows(rows)
    assert "tome r=10" in table and "baseline" in table and table.count("\n") == 3
    assert "of limit" in table.splitlines()[0] and "MAC fraction" in table.splitlines()[0]


@pytest.mark.slow
def test_compiled_rows_time_compiled_copies_that_compute_what_the_eager_cases_compute():
    rows = run("test_vit", [Case("tome r=10", "tome", {"r": 10})], batch=2, img_size=160, rounds=1, memory=False,
               compile=True)
    assert [row["case"] for row in rows] == ["baseline", "tome r=10"] and rows[1]["tokens_out"] == 101 - 6 * 10
    assert all(row["images_per_s"] > 0 and row["limit_images_per_s"] > 0 for row in rows)
    model = build("test_vit", Case("", "none"), torch.float32, "cpu")
    tome = create_reducer("tome", r=10)
    (compiled,) = compiled_models(model, [tome])
    x = images_for(model)[:2]
    with torch.inference_mode():
        want = tokenreduce.apply(model, tome)(x)
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
    assert tokenreduce.reducer_of(compiled._orig_mod) is not tome  # a copy: the compiled model owns its own


@pytest.mark.slow
def test_peak_memory_is_measured_in_a_fresh_process():
    peak = peak_memory_mb("test_vit", Case("tome", "tome", {"r": 4}), 2, 160, "float32", "cpu")
    assert 0 <= peak < 2000


def test_bench_and_demo_entry_points(capsys, tmp_path):
    out = tmp_path / "rows.json"
    bench_main(["--suite", "tome", "--model", "test_vit", "--batch", "1", "2", "--img-size", "160",
                "--rounds", "1", "--no-memory", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "tome r=13" in printed and out.exists()
    assert "batch=1 " in printed and "batch=2 " in printed and printed.count("of limit") == 2
    demo.main(["--model", "test_vit", "--batch", "1", "--rounds", "1"])
    printed = capsys.readouterr().out
    assert "tome r=16" in printed and "[197, 181, 165, 149, 133, 117, 101]" in printed


def test_images_per_second_uses_the_median():
    from tokenreduce.engine.speed import images_per_second

    assert images_per_second(8, [0.5, 4.0, 1.0]) == 8.0 and images_per_second(2, [0.25]) == 8.0


# --- the limit: the case's token counts, nothing paid to choose them -------------------------------
@pytest.mark.parametrize("name", [n for n in INVARIANT_SETTINGS if n != "none"])
def test_the_limit_has_the_case_token_counts_and_macs_without_the_reducers_own(name):
    model = tokenreduce.apply(make_model("test_vit"), name, **INVARIANT_SETTINGS[name])
    x = images_for(model)
    with torch.no_grad():
        model(x)
    case = tokenreduce.stats(model)
    state = model._tokenreduce.last_state
    costs = block_costs(model)
    # what the blocks cost at the case's counts, without its probes (MCTF) and its own matching
    backbone = sum(c.macs(r.tokens_attn, r.tokens_mlp) for c, r in zip(costs, state.records, strict=True))
    tokenreduce.apply(model, SpeedLimit.of(state))
    with torch.no_grad():
        model(x)
    limit = tokenreduce.stats(model)
    assert limit["tokens"] == case["tokens"]
    assert [r.tokens_mlp for r in model._tokenreduce.last_state.records] == [r.tokens_mlp for r in state.records]
    assert limit["macs_parts"]["blocks"] == backbone and limit["macs_parts"]["reducer"] == 0
    assert limit["macs"] == case["macs"] - case["macs_parts"]["reducer"] - (case["macs_parts"]["blocks"] - backbone)
    assert limit["macs"] * 2 * len(x) == counted_flops(model, x)


def test_the_limit_keeps_the_first_tokens_and_adds_no_bias():
    model = make_model("test_vit")
    x = images_for(model)
    limit = SpeedLimit([(101, 81), (81, 81)] + [(81, 81)] * (len(model.blocks) - 2))
    tokenreduce.apply(model, limit)
    with torch.no_grad():
        got = model.forward_features(x)
        tokenreduce.remove(model)
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        blk = model.blocks[0]
        h = h + blk.ls1(blk.attn(blk.norm1(h)))
        h = h[:, :81]
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        for blk in model.blocks[1:]:
            h = blk(h)
    torch.testing.assert_close(got, model.norm(h), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="limit: counts for 3 blocks; the model has"):
        tokenreduce.apply(make_model("test_vit"), SpeedLimit([(10, 10)] * 3))(x)
