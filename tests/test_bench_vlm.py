"""`make bench ARGS="--suite vlm"` (tokenreduce/bench/vlm.py) on a tiny LLaVA of LLaVA-1.5's layout."""

from __future__ import annotations

import json

import pytest
import torch
from vlm_checks import IMAGE, make_llava, uneven_prompts

import tokenreduce
from tokenreduce.bench import vlm as bench
from tokenreduce.bench.__main__ import main as bench_main
from tokenreduce.bench.harness import Case
from tokenreduce.errors import ConfigError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

PATCHES = 144  # the tiny model: a 48x48 image in 4x4 patches


@pytest.fixture(scope="module")
def tiny():
    return bench.build_llava("tiny", bench.LM_LAYERS, torch.float32, "cpu")


@pytest.fixture(scope="module")
def tiny_cases():
    return bench.default_cases("tiny", bench.LM_LAYERS)


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_llava15_config_is_the_published_one():
    config = bench.llava_config("llava15", bench.FULL_DEPTH)
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        1024, 4096, 24, 16)
    assert (vision.image_size, vision.patch_size, vision.hidden_act) == (336, 14, "quick_gelu")
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert (config.projector_hidden_act, config.image_token_id, text.pad_token_id) == ("gelu", 32000, 32001)
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads) == (
        4096, 11008, 32, 32)
    assert (text.vocab_size, text.rms_norm_eps, text.num_hidden_layers) == (32064, 1e-5, 32)
    with torch.device("meta"):  # no memory, no compute
        model = transformers.LlavaForConditionalGeneration(config)
    assert parameters(model.model.vision_tower) == 303_507_456  # CLIP ViT-L/14-336's vision model
    projector = model.model.multi_modal_projector  # mlp2x_gelu
    assert (projector.linear_1.in_features, projector.linear_1.out_features, projector.linear_2.out_features) == (
        1024, 4096, 4096)
    assert parameters(model.model.language_model.layers[0]) == 202_383_360  # one Llama-7B decoder layer
    assert parameters(model) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    # --lm-layers only changes the depth
    eight = bench.llava_config("llava15", 8)
    assert eight.text_config.num_hidden_layers == 8 and eight.vision_config.to_dict() == vision.to_dict()


def test_the_tiny_model_has_the_same_layout(tiny):
    big, small = bench.llava_config("llava15", 8), tiny.config
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act", "image_token_id"):
        assert getattr(small, key) == getattr(big, key)
    assert small.vision_config.hidden_act == "quick_gelu" and small.text_config.num_hidden_layers == 8
    assert bench.image_patches("tiny") == PATCHES and bench.image_patches("llava15") == 576
    assert bench.default_tokens("llava15") == [64, 128, 192] and bench.default_tokens("tiny") == [16, 32, 48]
    inputs = bench.prompt(tiny, 2)
    ids = inputs["input_ids"]
    assert ids.shape == (2, bench.TEXT_BEFORE + PATCHES + bench.TEXT_AFTER)
    assert (ids[:, bench.TEXT_BEFORE:-bench.TEXT_AFTER] == tiny.config.image_token_id).all()
    assert (ids != tiny.config.image_token_id).sum() == 2 * 32 and inputs["pixel_values"].shape == (2, 3, 48, 48)


def test_the_language_model_reducers_layers_are_scaled_to_the_depth():
    assert bench.lm_reducer_layers(32) == {"fastv": [2], "dart": [2], "pyramiddrop": [8, 16, 24],
                                           "sparsevlm": [2, 6, 15, 19]}
    assert bench.lm_reducer_layers(8) == {"fastv": [2], "dart": [2], "pyramiddrop": [2, 4, 6],
                                          "sparsevlm": [1, 2, 4, 5]}
    for depth in range(bench.LEAST_LM_LAYERS, bench.FULL_DEPTH + 1):
        layers = bench.lm_reducer_layers(depth)
        for name, low, high in (("pyramiddrop", 1, depth - 1), ("sparsevlm", 0, depth - 2)):
            got = layers[name]
            assert all(low <= a < b <= high for a, b in zip(got, got[1:], strict=False)) and got[0] >= low, depth
    with pytest.raises(ConfigError, match=r"--lm-layers=4 is too few .*allowed: an integer from 5 to 32"):
        bench.lm_reducer_layers(4)


def test_the_cases_keep_the_visual_tokens_asked_for(tiny, tiny_cases):
    labels = [case.label for case, _ in tiny_cases]
    assert labels[0] == "unreduced" and labels[-2:] == ["prumerge (adaptive)", "prumerge+ (adaptive)"]
    assert labels[1:-2] == [f"{name} {t}" for name in bench.MATCHED for t in (16, 32, 48)]
    generation = bench.Generation(tiny, bench.prompt(tiny, 1), 1)
    for case, reached in tiny_cases[1:]:
        tokenreduce.apply(tiny, case.reducer, **case.params)
        with torch.inference_mode():
            generation.prefill()
        final = tokenreduce.stats(tiny)["visual_tokens"][-1]
        tokenreduce.remove(tiny)
        if reached is None:  # PruMerge: adaptive, measured
            assert case.params == {} and 1 <= final < PATCHES
            continue
        target = int(case.label.split()[-1])
        assert final == reached, case  # the narrow twin's count is the timed model's
        # DART keeps 4 + 8k with its 4 + 4 pivots: the closest to 16 is 12 or 20
        assert final == target or (case.reducer == "dart" and abs(final - target) == 4), case
    params = {case.label: case.params for case, _ in tiny_cases}
    assert params["fastv 16"]["layer"] == 2 and params["dart 32"]["layer"] == 2
    assert params["pyramiddrop 48"]["layers"] == [2, 4, 6] and params["sparsevlm 16"]["layers"] == [1, 2, 4, 5]
    # SparseVLM: the rank rule off (it keeps all), its cap matched
    assert {k: params["sparsevlm 32"][k] for k in ("scale", "bias")} == {"scale": 0, "bias": PATCHES}
    assert set(params["pitome 16"]) == {"ratio"}
    # VisionZip's split of the paper: 54 + 10, 108 + 20, 162 + 30
    assert [bench.visionzip_contextual(t) for t in (64, 128, 192)] == [10, 20, 30]
    assert [params[f"visionzip {t}"]["contextual"] for t in (16, 32, 48)] == [2, 5, 8]
    assert tokenreduce.reducer_of(tiny) is None


def test_the_plans_at_the_real_size_are_the_papers_settings():
    plans = {p.label: p for p in bench.plans(8, [64, 128, 192])}
    assert {k: plans[f"visionzip {k}"].fixed["contextual"] for k in (64, 128, 192)} == {64: 10, 128: 20, 192: 30}
    assert plans["pyramiddrop 64"].fixed == {"layers": [2, 4, 6]} and plans["fastv 128"].fixed == {"layer": 2}
    assert plans["pitome 192"].fixed == {} and plans["prumerge (adaptive)"].tokens is None
    assert bench.match_tolerance(plans["dart 64"]) == 4 / 64 and bench.match_tolerance(plans["fastv 64"]) == 0.02


def decoder_calls(model):
    """A hook recording each call of the model: (its reducer or None, "prefill" or "decode")."""
    calls = []

    def record(module, args, kwargs):
        reducer = tokenreduce.reducer_of(module)
        mode = "prefill" if "pixel_values" in kwargs else "decode"
        calls.append((reducer.name if reducer is not None else None, mode))

    return calls, model.register_forward_pre_hook(record, with_kwargs=True)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_case_runs_in_every_round_and_the_model_is_left_unpatched(tiny, tiny_cases):
    cases = [case for case, _ in tiny_cases if case.label in (
        "unreduced", "fastv 16", "sparsevlm 16", "visionzip 16", "pitome 32", "prumerge (adaptive)")]
    model_class, hooks = type(tiny), hook_count(tiny)
    calls, handle = decoder_calls(tiny)
    prefill, decode, measured = bench.time_cases(tiny, bench.prompt(tiny, 1), cases, rounds=2, new_tokens=2)
    handle.remove()
    # the unreduced stats pass, then the warm-up and 2 rounds: each case's prefill then its 2 decode steps
    assert calls[0] == ("none", "prefill")
    names = [None if c.reducer == bench.NONE else c.reducer for c in cases]
    one_round = [(name, mode) for name in names for mode in ("prefill", "decode", "decode")]
    assert calls[1:] == one_round * 3
    assert [len(s) for s in prefill] == [2] * len(cases) and [len(s) for s in decode] == [2] * len(cases)
    # the model as transformers built it
    assert type(tiny) is model_class and hook_count(tiny) == hooks and not hasattr(tiny, "_tokenreduce")
    assert tokenreduce.reducer_of(tiny) is None
    # what each case's warm-up prefill measured
    assert measured[0].stats["visual_tokens"][-1] == PATCHES
    assert all(m.stats["macs"] < measured[0].stats["macs"] for m in measured[1:])
    assert all(m.kv_bytes < measured[0].kv_bytes for m in measured[1:])
    assert measured[3].stats["visual_tokens"] == [16] * 8  # VisionZip: from the first layer on


@pytest.mark.parametrize(("name", "params"), [
    ("none", {}), ("fastv", {"keep": 0.25}), ("visionzip", {"dominant": 10, "contextual": 2}), ("pitome", {"ratio": 0.8}),
])
def test_decoding_continues_the_prefills_cache_as_generate_does(tiny, name, params):
    generation = bench.Generation(tiny, bench.prompt(tiny, 1), 3)
    assert_decodes_as_generate(generation, name, params)


def test_a_batch_whose_images_keep_different_counts_decodes_as_generate_does():
    # the shared tiny LLaVA of the vlm tests, whose two uneven images PruMerge cuts to 2 and 3 tokens:
    # the shortened batch is left-padded again
    model = make_llava()
    prompt = [1, 5, 6] + [IMAGE] * 16 + [7, 8, 9]
    ids = torch.tensor([prompt, prompt])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": uneven_prompts()["pixel_values"]}
    counts = assert_decodes_as_generate(bench.Generation(model, inputs, 3), "prumerge", {"neighbours": 4})
    assert counts == [2, 3]


def assert_decodes_as_generate(generation, name, params):
    """The prefill's first token and the decode steps are what greedy `generate` gives; the counts
    each image kept."""
    model, inputs = generation.model, generation.inputs
    batch, width = inputs["input_ids"].shape
    tokenreduce.apply(model, name, **params)
    try:
        with torch.inference_mode():
            cache, first = generation.prefill()
            cached = cache.get_seq_length()
            steps = generation.decode(cache, first)
            counts = tokenreduce.stats(model).get("visual_per_image")
            reference = model.generate(**inputs, max_new_tokens=4, do_sample=False,
                                       suppress_tokens=[model.config.image_token_id])[:, width:]
    finally:
        tokenreduce.remove(model)
    assert cache.get_seq_length() == cached + 3 and steps.shape == (batch, 3)
    # greedy, as generate (which may stop early, at the end-of-sequence token)
    assert torch.equal(torch.cat([first, steps], dim=1)[:, : reference.shape[1]], reference), name
    return counts


def fake_cases():
    return [Case("unreduced", bench.NONE), Case("fastv 64", "fastv", {"layer": 2, "keep": 0.111}),
            Case("visionzip 64", "visionzip", {"dominant": 54, "contextual": 10}), Case("prumerge", "prumerge")]


def fake_measured():
    stats = [{"visual_tokens": [576] * 4, "macs": 1000e9, "decode_macs": 2e9},
             {"visual_tokens": [576, 576, 64, 64], "macs": 500e9, "decode_macs": 1.8e9},
             {"visual_tokens": [64] * 4, "macs": 250e9, "decode_macs": 1.5e9},
             {"visual_tokens": [30] * 4, "macs": 200e9, "decode_macs": 1.4e9}]
    return [bench.Measured(s, b) for s, b in zip(stats, (4 * 2**20, 2 * 2**20, 2**20, 2**19), strict=True)]


def test_summarise_computes_the_ratios_from_the_times():
    prefill = [[2.0, 9.0, 2.0], [1.0, 1.0, 0.5], [0.5, 0.5, 0.5], [4.0, 4.0, 4.0]]
    decode = [[1.6, 1.6, 3.2], [0.8, 0.8, 0.8], [0.4, 0.8, 0.8], [1.6, 1.6, 1.6]]  # 16 tokens each
    rows = bench.summarise(fake_cases(), prefill, decode, 16, fake_measured(), [100.0, 50.0, 25.0, None])
    base, fastv, zipped, merged = rows
    assert [r["prefill_s"] for r in rows] == [2.0, 1.0, 0.5, 4.0]  # medians: one slow round changes nothing
    assert [r["prefill_speedup"] for r in rows] == [1.0, 2.0, 4.0, 0.5]
    assert [r["decode_ms"] for r in rows] == pytest.approx([100.0, 50.0, 50.0, 100.0])  # per token
    assert [r["decode_speedup"] for r in rows] == pytest.approx([1.0, 2.0, 2.0, 1.0])
    assert fastv["visual_tokens"] == 64 and fastv["visual_mean"] == 320 and zipped["visual_mean"] == 64
    assert fastv["mac_fraction"] == 0.5 and zipped["gmacs"] == 250 and merged["decode_gmacs"] == 1.4
    assert base["kv_mb"] == 4 and merged["kv_mb"] == 0.5
    assert fastv["memory"] == 0.5 and zipped["memory"] == 0.25 and merged["memory"] is None
    assert fastv["prefill_spread"] == 0.5 and base["decode_spread"] == 1.0


def report_rows(spread: float = 0.0):
    settings = {"model": "llava15", "described": "CLIP tower 24 layers x 1024", "lm_layers": 8, "batch": 1,
                "lm_reducer_layers": bench.lm_reducer_layers(8), "new_tokens": 16, "dtype": "float32",
                "device": "cpu", "rounds": 3, "load_before": 1.0, "load_after": 1.5, "cores": 2, "threads": 2}
    rows = bench.summarise(fake_cases(), [[2.0], [1.0], [0.5], [4.0]], [[1.6], [0.8], [0.8], [1.6]], 16,
                           fake_measured(), [None] * 4)
    matched = [None, 64, 63, None]
    return [{**settings, **r, "prefill_spread": spread, "matched": m} for r, m in zip(rows, matched, strict=True)]


def test_the_table_and_report_show_every_row_and_the_protocol():
    lines = bench.format_table(report_rows()).splitlines()
    assert len(lines) == 2 + 4 and "prefill speed-up" in lines[0] and "decode ms/token" in lines[0]
    assert lines[1] == "|---|---|" + "---:|" * 11
    assert lines[2] == "| unreduced | - | 576 | 576 | 2.000 | 1.00x | 100.0 | 1.00x | 1000.0 | 1.000 | 4.0 | - | - |"
    assert lines[3] == "| fastv 64 | keep=0.111 | 64 | 320 | 1.000 | 2.00x | 50.0 | 2.00x | 500.0 | 0.500 | 2.0 | - | - |"
    assert lines[4].startswith("| visionzip 64 | dominant=54, contextual=10 | 64* | 64 | 0.500 | 4.00x |")
    text = bench.report(report_rows())
    assert "8 decoder layers (LLaVA-1.5-7B has 32)" in text and "device=cpu dtype=float32 threads=2 rounds=3" in text
    assert "pyramiddrop [2, 4, 6], sparsevlm [1, 2, 4, 5]" in text and "load average 1.0 before timing" in text
    protocol = text.splitlines()[-1]
    assert protocol.startswith("prefill: median seconds") and "match_visual_tokens" in protocol
    assert "* not the count the setting reached" in protocol and "~" not in protocol
    assert "2.000~" in bench.report(report_rows(spread=0.5)) and "~ rounds over 10% apart" in bench.report(
        report_rows(spread=0.5))


def test_the_cli_prints_the_table_with_every_case(capsys, tmp_path):
    out = tmp_path / "rows.json"
    bench_main(["--suite", "vlm", "--model", "tiny", "--tokens", "16", "--rounds", "1", "--new-tokens", "1",
                "--no-memory", "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("vlm: LlavaForConditionalGeneration --model tiny (random weights), 8 decoder layers")
    labels = [line.split(" | ")[0].lstrip("| ") for line in printed.splitlines() if line.startswith("| ")][1:]
    assert labels == ["unreduced"] + [f"{name} 16" for name in bench.MATCHED] + [
        "prumerge (adaptive)", "prumerge+ (adaptive)"]
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == labels
    assert all(r["suite"] == "vlm" and r["batch"] == 1 and r["peak_mb"] is None and r["rounds"] == 1 for r in rows)
    assert all(r["visual_tokens"] == r["matched"] for r in rows if r["matched"] is not None)


def test_only_a_named_vlm_suite_runs(monkeypatch):
    import tokenreduce.bench.__main__ as cli

    ran = []
    monkeypatch.setattr(cli, "run", lambda model, cases, *args, **kw: ran.append(("vit", model)) or [])
    monkeypatch.setattr(cli, "format_rows", lambda rows: "")
    monkeypatch.setattr(bench, "run", lambda *args, **kw: ran.append(("vlm", args[:4], args[6])) or [{}])
    monkeypatch.setattr(bench, "report", lambda rows: "")
    cli.main(["--batch", "1"])  # every ViT suite, no vlm
    assert ran == [("vit", cli.VIT_MODEL)]
    ran.clear()
    cli.main(["--suite", "vlm"])  # its defaults
    assert ran == [("vlm", ("llava15", 8, None, 1), 3)]
    ran.clear()
    cli.main(["--suite", "vlm", "--model", "tiny", "--lm-layers", "6", "--tokens", "8", "--batch", "1", "2"])
    assert ran == [("vlm", ("tiny", 6, [8], 1), 3), ("vlm", ("tiny", 6, [8], 2), 3)]
    ran.clear()
    cli.main(["--suite", "tome", "--suite", "vlm", "--batch", "1", "--rounds", "2"])
    assert ran == [("vit", cli.VIT_MODEL), ("vlm", ("llava15", 8, None, 1), 2)]


@pytest.mark.parametrize("args, message", [
    (["--lm-layers", "4"], "--lm-layers=4 is invalid; allowed: an integer from 5"),
    (["--lm-layers", "33"], "--lm-layers=33 is invalid; allowed: an integer from 5"),
    (["--tokens", "0"], "--tokens=0 is invalid; allowed: integers from 1 to 143"),
    (["--tokens", "16", "144"], "--tokens=144 is invalid; allowed: integers from 1 to 143"),
    (["--new-tokens", "0"], "--new-tokens=0 is invalid; allowed: an integer >= 1"),
    (["--batch", "0"], "--batch=0 is invalid; allowed: an integer >= 1"),
    (["--rounds", "0"], "--rounds=0 is invalid; allowed: an integer >= 1"),
    (["--dtype", "bfloat16"], "--dtype='bfloat16' is invalid on cpu; allowed there: float32"),
    (["--model", "llava99"], "--model='llava99' is invalid for the vlm suite; allowed: llava15, tiny"),
    (["--suite", "tome"], "--model='tiny' with --suite vlm and ViT suites (tome) is ambiguous"),
    (["--lm-layers", "x"], "--lm-layers: invalid int value: 'x'"),
])
def test_bad_options_are_named_with_what_is_allowed(args, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *a, **kw: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--suite", "vlm", "--model", "tiny", "--device", "cpu", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_refusals_come_before_any_model_is_built():
    with pytest.raises(ConfigError, match="the first must be the unreduced model"):
        bench.time_cases(None, {}, [Case("fastv", "fastv")], rounds=1, new_tokens=1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device='cuda' but this machine has no usable GPU; allowed here: cpu"):
            bench.run("tiny", device="cuda", memory=False)


@pytest.mark.slow
def test_peak_memory_is_read_in_a_fresh_process():
    for case in (Case("", bench.NONE), Case("", "visionzip", {"dominant": 10, "contextual": 2})):
        assert 0 <= bench.peak_memory_mb("tiny", 8, case, 1, "float32", "cpu") < 1000


@pytest.mark.slow
def test_the_settings_at_the_real_size_reach_the_papers_counts():
    # matched on the narrow twin of LLaVA-1.5-7B's depths and token counts (seconds)
    for case, reached in bench.default_cases("llava15", 8)[1:-2]:
        target = int(case.label.split()[-1])
        if case.reducer == "dart":  # 4 + 8k: 60, 124, 188
            assert reached == target - 4, case
        else:
            assert abs(reached - target) <= 0.02 * target, case

