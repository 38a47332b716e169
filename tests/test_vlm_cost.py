"""The cost of a vision-language model's prefill and decoding in `stats`, and the settings matched by
visual tokens kept (`match_visual_tokens`) or by prefill MACs (`match_macs`) on a tiny random LLaVA
(docs/vlm.md, "Cost and matched settings")."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from vlm_checks import make_llava

import tokenreduce
from tokenreduce.adapters.hf_vlm import probe_inputs
from tokenreduce.cost import RATIO_STEP, match_macs, match_visual_tokens, probe_pass
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import reducer_class

transformers = pytest.importorskip("transformers")

PATCHES = 16  # make_llava: a 16x16 image in 4x4 patches; strategy "default" drops the CLS token


@pytest.fixture(scope="module")
def eager():
    # eager attention: the FLOP counter sees its matmuls (it does not count the CPU's fused sdpa kernel)
    return make_llava("eager")


def counted_macs(module, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(*args, **kwargs)
    return counter.get_total_flops() // 2


def probe(model, name: str, **params) -> dict:
    tokenreduce.apply(model, name, **params)
    try:
        return probe_pass(model)
    finally:
        tokenreduce.remove(model)


def test_the_unreduced_prefill_costs_what_the_flop_counter_counts(eager):
    stats = probe(eager, "none")
    inputs = probe_inputs(eager)
    parts = stats["macs_parts"]
    assert parts["vision_tower"] == counted_macs(eager.model.vision_tower, inputs["pixel_values"])
    assert parts["projector"] == PATCHES * sum(
        m.weight.numel() for m in eager.model.multi_modal_projector.modules() if isinstance(m, torch.nn.Linear))
    # the whole prefill (LlavaModel: tower, projector, decoder layers; no logits) counted op by op
    assert stats["macs"] == parts["total"] == counted_macs(eager.model, **inputs)
    assert parts["reducer"] == 0


def test_decoding_one_token_costs_what_the_flop_counter_counts(eager):
    inputs = probe_inputs(eager)
    for name, params in (("none", {}), ("fastv", {"layer": 2, "keep": 0.25}), ("visionzip", {"dominant": 4,
                                                                                          "contextual": 2})):
        tokenreduce.apply(eager, name, **params)
        try:
            with torch.inference_mode():
                out = eager(**inputs, use_cache=True)
            stats = tokenreduce.stats(eager)
            step = {"input_ids": torch.tensor([[5]]), "past_key_values": out.past_key_values,
                    "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)}
            assert stats["decode_macs"] == counted_macs(eager, **step), name
        finally:
            tokenreduce.remove(eager)


def test_each_placement_prices_its_own_part(eager):
    unreduced = probe(eager, "none")["macs_parts"]
    projector_per_token = unreduced["projector"] // PATCHES
    # (c) the tower and projector run whole; the language model's layers after the cut run fewer tokens
    fastv = probe(eager, "fastv", layer=2, keep=0.5)
    assert fastv["macs_parts"]["vision_tower"] == unreduced["vision_tower"]
    assert fastv["macs_parts"]["projector"] == unreduced["projector"]
    assert fastv["macs_parts"]["blocks"] < unreduced["blocks"] and fastv["macs_parts"]["reducer"] > 0
    # (b) the projector gets the kept tokens only; the tower runs whole
    zipped = probe(eager, "visionzip", dominant=5, contextual=3)
    assert zipped["macs_parts"]["vision_tower"] == unreduced["vision_tower"]
    assert zipped["macs_parts"]["projector"] == 8 * projector_per_token
    # (a) the tower's own reduced MACs, and the projector on the merged tokens
    merged = probe(eager, "pitome", ratio=0.9)
    assert merged["macs_parts"]["vision_tower"] == merged["tower"]["macs"] < unreduced["vision_tower"]
    assert merged["macs_parts"]["projector"] == merged["visual_tokens"][0] * projector_per_token
    for stats in (fastv, zipped, merged):
        assert stats["macs"] == sum(v for k, v in stats["macs_parts"].items() if k != "total")
        assert stats["decode_macs"] < unreduced_decode(eager)


def unreduced_decode(model) -> int:
    return probe(model, "none")["decode_macs"]


@pytest.mark.parametrize(("name", "tokens", "fixed"), [
    ("fastv", 8, {"layer": 2}),
    ("fastv", 3, {"layer": 1}),
    ("visionzip", 8, {"contextual": 2}),
    ("dart", 9, {"layer": 2, "image_pivots": 1, "text_pivots": 1}),
    ("pyramiddrop", 4, {"layers": [1, 3]}),
    ("pitome", 12, {}),
    ("sparsevlm", 6, {"layers": [1, 3], "scale": 100.0}),
])
def test_a_matched_setting_keeps_the_tokens_asked_for(eager, name, tokens, fixed):
    params, reached = match_visual_tokens(eager, name, tokens, **fixed)
    assert reached == tokens and {k: params[k] for k in fixed} == fixed
    assert probe(eager, name, **params)["visual_tokens"][-1] == tokens
    assert tokenreduce.reducer_of(eager) is None  # the model is left as it came


def test_the_match_is_the_closest_count_on_the_grid(eager):
    # brute force over every budget DART accepts on 16 image tokens (2 pivots: counts 1, 3, 5, ...)
    counts = {b: probe(eager, "dart", layer=2, budget=b, image_pivots=1, text_pivots=1)["visual_tokens"][-1]
              for b in range(0, 15)}
    for tokens in (5, 7, 13):
        params, reached = match_visual_tokens(eager, "dart", tokens, layer=2, image_pivots=1, text_pivots=1)
        best = min(abs(c - tokens) for c in counts.values())
        assert abs(reached - tokens) == best and counts[params["budget"]] == reached
    # a keep ratio: the count of the ratio found, and the next grid step keeps one token fewer or more
    params, reached = match_visual_tokens(eager, "fastv", 6, layer=2)
    above = probe(eager, "fastv", layer=2, keep=round(params["keep"] + RATIO_STEP, 6))["visual_tokens"][-1]
    assert reached == 6 and above == 7


def test_the_mean_measure_prices_stages_by_what_the_layers_process(eager):
    params, reached = match_visual_tokens(eager, "pyramiddrop", 8, measure="mean", layers=[1, 3])
    per_layer = probe(eager, "pyramiddrop", **params)["visual_tokens"]
    assert reached == pytest.approx(sum(per_layer) / len(per_layer)) and abs(reached - 8) <= 0.16
    final, _ = match_visual_tokens(eager, "pyramiddrop", 8, layers=[1, 3])
    assert final["ratio"] > params["ratio"]  # keeping 8 at the end removes less than a mean of 8


def test_match_macs_on_a_vision_language_model_prices_the_whole_prefill(eager):
    params, reached = match_macs(eager, "fastv", 0.8, layer=2)
    unreduced = probe(eager, "none")["macs"]
    assert reached == pytest.approx(probe(eager, "fastv", **params)["macs"] / unreduced)
    assert abs(reached - 0.8) <= 0.016


def test_the_refusals_name_the_parameter(eager):
    with pytest.raises(ConfigError, match="'prumerge' has no strength parameter"):
        match_visual_tokens(eager, "prumerge", 8)
    with pytest.raises(ConfigError, match="tokens=0 is invalid"):
        match_visual_tokens(eager, "fastv", 0)
    with pytest.raises(ConfigError, match="measure='median' is invalid; allowed: 'final', 'mean'"):
        match_visual_tokens(eager, "fastv", 8, measure="median")
    with pytest.raises(ConfigError, match=r"tokens=8 is out of reach for dart: budget from 0 to 16 gives visual "
                                          r"tokens 1\.000 to 15\.000 \(budget beyond 15 is refused"):
        match_visual_tokens(eager, "dart", 8, layer=2, image_pivots=1, text_pivots=1)
    assert tokenreduce.reducer_of(eager) is None


def test_visual_tokens_need_a_vision_language_model():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    with pytest.raises(ConfigError, match="has no visual tokens"):
        match_visual_tokens(vit, "tome", 4)


def test_the_vision_language_reducers_name_their_strength():
    assert [s.param for s in reducer_class("fastv").strength] == ["keep"]
    assert [s.param for s in reducer_class("pyramiddrop").strength] == ["ratio"]
    assert [s.param for s in reducer_class("dart").strength] == ["budget"]
    assert [s.param for s in reducer_class("visionzip").strength] == ["dominant"]
    assert [s.param for s in reducer_class("sparsevlm").strength] == ["keep"]
    assert reducer_class("prumerge").strength == () and reducer_class("prumerge+").strength == ()
