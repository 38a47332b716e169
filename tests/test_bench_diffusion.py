"""`make bench ARGS="--suite diffusion"` (tokenreduce/bench/diffusion.py) on a tiny U-Net of SD 1.5's layout."""

from __future__ import annotations

import json

import pytest
import torch

import tokenreduce
from tokenreduce.bench import diffusion as bench
from tokenreduce.bench.__main__ import main as bench_main
from tokenreduce.bench.harness import Case
from tokenreduce.engine.speed import interleaved_setup_times
from tokenreduce.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = [c.label for c in bench.default_cases()]


def tiny_inputs(latent: int = 16):
    return bench.unet_inputs("tiny", latent, torch.float32, "cpu")


def test_the_sd15_config_is_the_published_one():
    config = bench.SD15_UNET
    assert config["block_out_channels"] == (320, 640, 1280, 1280)
    assert (config["sample_size"], config["in_channels"], config["out_channels"]) == (64, 4, 4)
    assert (config["layers_per_block"], config["cross_attention_dim"], config["attention_head_dim"]) == (2, 768, 8)
    assert config["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert config["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert (config["norm_num_groups"], config["norm_eps"], config["act_fn"]) == (32, 1e-5, "silu")
    with torch.device("meta"):  # no memory, no compute
        unet = diffusers.UNet2DConditionModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's U-Net
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn" and not unet.config.use_linear_projection
    tiny = bench.TINY_UNET
    assert all(tiny[key] == config[key] for key in ("down_block_types", "up_block_types", "attention_head_dim"))
    assert len(tiny["block_out_channels"]) == 4


def test_the_cases_pair_ours_with_the_original_tomesd_at_each_ratio():
    cases = bench.default_cases()
    assert cases[0] == Case("unreduced", bench.NONE)
    for ratio in bench.RATIOS:
        assert Case(f"tomesd ratio={ratio}", "tomesd", {"ratio": ratio}) in cases
        assert Case(f"original tomesd ratio={ratio}", bench.ORIGINAL, {"ratio": ratio}) in cases
    assert {c.reducer for c in cases} == {bench.NONE, "tomesd", bench.ORIGINAL, "todo", "tome", "pitome", "tofu"}


def test_the_mergers_keep_what_tomesd_keeps_at_each_ratio():
    # tomesd's ratio is the fraction merged away, the mergers' the fraction kept: 0.3 -> 0.7, 0.5 -> 0.5;
    # 0.6 would merge more than the half a bipartite merge can
    kept = {(c.reducer, c.params["ratio"]) for c in bench.default_cases() if c.reducer in ("tome", "pitome", "tofu")}
    assert kept == {(name, keep) for name in ("tome", "pitome", "tofu") for keep in (0.7, 0.5)}


def fake_cases():
    return [Case("unreduced", bench.NONE), Case("tomesd ratio=0.5", "tomesd", {"ratio": 0.5}),
            Case("original tomesd ratio=0.5", bench.ORIGINAL, {"ratio": 0.5}), Case("todo", "todo", {"downsample": 2})]


def test_summarise_computes_the_ratios_from_the_times():
    seconds = [[2.0, 9.0, 2.0], [1.0, 1.0, 0.5], [1.25, 1.25, 1.25], [4.0, 4.0, 4.0]]
    rows = bench.summarise(fake_cases(), seconds, [100.0, 60.0, None, 80.0], 400.0, [50.0, 20.0, 25.0, None])
    base, ours, original, todo = rows
    assert [r["seconds"] for r in rows] == [2.0, 1.0, 1.25, 4.0]  # medians: one slow round changes nothing
    assert base["speedup"] == 1 and ours["speedup"] == 2.0 and original["speedup"] == 1.6 and todo["speedup"] == 0.5
    assert ours["vs_original"] == 1.25 and original["vs_original"] is None and todo["vs_original"] is None
    assert ours["mac_fraction_blocks"] == 0.6 and ours["mac_fraction"] == (400 - 100 + 60) / 400
    assert original["mac_fraction_blocks"] is None and original["mac_fraction"] is None
    assert ours["memory"] == 0.4 and original["memory"] == 0.5 and todo["memory"] is None


def test_the_table_and_report_show_every_row_and_the_published_figure():
    seconds = [[2.0], [1.0], [1.25], [4.0]]
    settings = {"unet": "sd15", "latent": 64, "batch": 2, "dtype": "float32", "device": "cpu", "rounds": 1,
                "load_before": 1.0, "load_after": 1.5, "cores": 2, "threads": 2}
    rows = [{**settings, **r} for r in bench.summarise(fake_cases(), seconds, [100.0, 60.0, None, 80.0], 400.0,
                                                       [None] * 4)]
    table = bench.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 4 and "vs original" in lines[0] and "MACs (U-Net)" in lines[0]
    assert lines[3] == "| tomesd ratio=0.5 | 1.000 | 2.00x | 1.25x | 0.600 | 0.900 | - | - |"
    assert lines[4] == "| original tomesd ratio=0.5 | 1.250 | 1.60x | - | - | - | - | - |"
    text = bench.report(rows)
    assert "latent 64x64 (512x512 images)" in text and "threads=2 rounds=1" in text and "device=cpu" in text
    published = next(line for line in text.splitlines() if line.startswith("published:"))
    assert "1.87x" in published and "2.00x" in published and "1.60x" in published
    assert "not the published setting" not in published
    noisy = [{**r, "spread": 0.5} for r in rows]
    assert "1.000~" in bench.report(noisy) and "~ rounds over 10% apart" in bench.report(noisy)


def test_interleaved_setup_times_sets_each_case_up_before_its_own_passes():
    seen, current = [], []
    model = torch.nn.Module()
    model.forward = lambda x: seen.append(current[-1])
    setups = [lambda: current.append("a"), lambda: current.append("b")]
    times = interleaved_setup_times(model, setups, torch.zeros(1), warmup=1, rounds=2)
    assert seen == ["a", "b", "a", "b", "a", "b"] and [len(t) for t in times] == [2, 2]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_ours_and_the_original_tomesd_are_never_on_the_unet_together():
    pytest.importorskip("tomesd")
    unet = bench.build_unet("tiny", torch.float32, "cpu")
    hooks = hook_count(unet)
    calls = []

    def record(module, args):
        reducer = tokenreduce.reducer_of(module)
        calls.append((reducer.name if reducer else None, bench.active_patches(module)))

    handle = unet.register_forward_pre_hook(record)
    cases = bench.default_cases()
    seconds, block_macs, total = bench.time_cases(unet, tiny_inputs(), cases, rounds=1)
    handle.remove()
    # the MAC pass, a warm-up call per case, one round
    assert len(calls) == 1 + 2 * len(cases) and [len(s) for s in seconds] == [1] * len(cases)
    for (name, active), case in zip(calls[1:], cases + cases, strict=True):
        if case.reducer == bench.ORIGINAL:
            assert name is None and active == {"tomesd"}
        elif case.reducer == bench.NONE:
            assert name is None and active == set()
        else:
            assert name == case.reducer and active == {"tokenreduce"}
    # the U-Net is left as diffusers built it
    assert bench.active_patches(unet) == set() and hook_count(unet) == hooks
    assert not any(hasattr(m, "_tome_info") for m in unet.modules()) and not hasattr(unet, "_tokenreduce")
    assert all(type(m).__name__ != "ToMeBlock" for m in unet.modules())
    # stats for our cases only, and below the unreduced blocks'
    for case, macs in zip(cases, block_macs, strict=True):
        assert (macs is None) == (case.reducer == bench.ORIGINAL)
        assert macs is None or macs <= block_macs[0] < total


def test_placing_a_case_takes_the_other_patch_off():
    pytest.importorskip("tomesd")
    unet = bench.build_unet("tiny", torch.float32, "cpu")
    bench.place(unet, Case("", bench.ORIGINAL, {"ratio": 0.5}))
    assert bench.active_patches(unet) == {"tomesd"}
    bench.place(unet, Case("", "tomesd", {"ratio": 0.5}))
    assert bench.active_patches(unet) == {"tokenreduce"} and tokenreduce.reducer_of(unet).name == "tomesd"
    bench.place(unet, Case("", bench.ORIGINAL, {"ratio": 0.5}))
    assert bench.active_patches(unet) == {"tomesd"} and tokenreduce.reducer_of(unet) is None
    bench.place(unet, Case("", bench.NONE))
    assert bench.active_patches(unet) == set()


def test_the_cli_prints_a_table_per_latent_size_with_every_case(capsys, tmp_path):
    out = tmp_path / "rows.json"
    bench_main(["--suite", "diffusion", "--unet", "tiny", "--latents", "16", "24", "--rounds", "1", "--no-memory",
                "--json", str(out)])
    printed = capsys.readouterr().out
    assert "latent 16x16 (128x128 images)" in printed and "latent 24x24 (192x192 images)" in printed
    tables = printed.split("diffusion: U-Net tiny")[1:]
    expected = LABELS if bench.original_available() else [x for x in LABELS if "original" not in x]
    assert len(tables) == 2
    for table in tables:
        labels = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
        assert labels == expected and "published: 1.87x" in table
    rows = json.loads(out.read_text())
    assert [r["latent"] for r in rows] == [16] * len(expected) + [24] * len(expected)
    assert all(r["suite"] == "diffusion" and r["batch"] == 2 and r["peak_mb"] is None for r in rows)


def test_only_a_named_diffusion_suite_runs(monkeypatch, capsys):
    import tokenreduce.bench.__main__ as cli

    ran = []
    monkeypatch.setattr(cli, "run", lambda model, cases, *args, **kw: ran.append(("vit", len(cases))) or [])
    monkeypatch.setattr(cli, "format_rows", lambda rows: "")
    monkeypatch.setattr(bench, "run", lambda *args, **kw: ran.append(("diffusion", args[1])) or [{}])
    monkeypatch.setattr(bench, "report", lambda rows: "")
    cli.main(["--batch", "1"])  # every ViT suite, no diffusion
    assert ran == [("vit", sum(map(len, cli.SUITES.values())))]
    ran.clear()
    cli.main(["--suite", "diffusion", "--unet", "tiny", "--latents", "16", "24"])
    assert ran == [("diffusion", 16), ("diffusion", 24)]
    ran.clear()
    cli.main(["--suite", "tome", "--suite", "diffusion", "--batch", "1", "--unet", "tiny", "--latents", "16"])
    assert ran == [("vit", len(cli.SUITES["tome"])), ("diffusion", 16)]


@pytest.mark.parametrize("args, message", [
    (["--latents", "60"], "--latents=60 is invalid; allowed: multiples of 8"),
    (["--latents", "0"], "--latents=0 is invalid"),
    (["--dtype", "float16"], "--dtype='float16' is invalid on cpu; allowed there: float32"),
    (["--rounds", "0"], "--rounds=0 is invalid; allowed: an integer >= 1"),
    (["--device", "tpu"], "--device='tpu' is invalid; allowed: cpu, cuda, cuda:N"),
    (["--unet", "sd99"], "--unet: invalid choice: 'sd99' (choose from"),  # then sd15, tiny (quoted or not)
])
def test_bad_options_are_named_with_what_is_allowed(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--suite", "diffusion", "--unet", "tiny", "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and ("sd15" in err and "tiny" in err or "--unet" not in message)


def test_check_settings_refuses_a_gpu_that_is_not_there():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"--device='cuda' but this machine has no usable GPU; allowed here: cpu"):
        bench.check_settings("tiny", [16], "float32", "cuda", 1)
    with pytest.raises(ConfigError, match=r"--unet='big' is invalid; allowed: sd15, tiny"):
        bench.check_settings("big", [16], "float32", "cpu", 1)
    with pytest.raises(ConfigError, match="the first must be the unreduced call"):
        bench.time_cases(None, tiny_inputs(), bench.default_cases()[1:], rounds=1)


@pytest.mark.slow
def test_peak_memory_is_read_in_a_fresh_process_for_ours_and_the_original():
    pytest.importorskip("tomesd")
    for case in (Case("", "tomesd", {"ratio": 0.5}), Case("", bench.ORIGINAL, {"ratio": 0.5})):
        assert 0 <= bench.peak_memory_mb("tiny", case, 16, "float32", "cpu") < 1000
