"""Visual tokens dropped inside the language model of a transformers LlavaForConditionalGeneration
during the prefill (FastV, PyramidDrop, DART; docs/vlm.md), on a tiny random LLaVA: zero reduction is
the unpatched model; `remove` restores it; the counts per layer follow each schedule; greedy
generation with the KV cache equals generation without it; a left-padded batch gives each prompt
what it gets alone; the selections equal plain-loop references; sdpa and eager select alike; and
every refusal comes before any compute."""

from __future__ import annotations

import pytest
import torch
from vlm_checks import (
    IMAGE,
    IMPLS,
    check_batch_equals_each_alone,
    check_batch_is_wrong_once_broken,
    check_cache_equals_no_cache,
    check_generate_refused_before_any_compute,
    check_unpatched_when_nothing_is_reduced,
    compute_counter,
    continue_by_hand,
    generate,
    make_llava,
    prompts,
    solo,
    unreduced_macs,
)

import tokenreduce
from tokenreduce.adapters import adapter_for, hf_vlm
from tokenreduce.core.visual_tokens import dart_keep_count, fastv_keep_count, pyramid_schedule
from tokenreduce.errors import ConfigError, UnsupportedModelError

transformers = pytest.importorskip("transformers")

# each reducer at a setting that drops tokens on the 5-layer language model, and its counts of image
# tokens through layers 0..4 (16 image tokens per prompt)
REDUCING = {
    "fastv": ({"layer": 2, "keep": 0.25}, [16, 16, 4, 4, 4]),
    "pyramiddrop": ({"layers": [1, 3], "ratio": 0.5}, [16, 8, 8, 4, 4]),
    "dart": ({"layer": 2, "budget": 8, "image_pivots": 1, "text_pivots": 1}, [16, 16, 9, 9, 9]),
}
ZERO = {"fastv": {"layer": 2, "keep": 1.0}, "pyramiddrop": {"layers": [1, 3], "ratio": 1.0}, "none": {}}


# --- exactness, removal, counts ----------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", sorted(ZERO))
def test_zero_reduction_equals_the_unpatched_model(attn, name):
    model = make_llava(attn)
    check_unpatched_when_nothing_is_reduced(generate, model, prompts(), name, ZERO[name])
    assert tokenreduce.stats(model)["visual_tokens"] == [16] * 5


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_remove_restores_the_model(name):
    model, inputs = make_llava(), prompts()
    cls = type(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        tokenreduce.apply(model, name, **REDUCING[name][0])
        reduced = model(**inputs).logits
        assert reduced.shape[1] < expected.shape[1]  # the logits are those of the kept positions
        tokenreduce.remove(model)
        assert type(model) is cls and not hasattr(model, "_tokenreduce") and not hasattr(model, "token_reducer")
        assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_visual_tokens_per_layer_follow_the_schedule(name):
    params, expected = REDUCING[name]
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, name, **params)
    with torch.no_grad():
        logits = model(**inputs).logits
    stats = tokenreduce.stats(model)
    assert stats["visual_tokens"] == expected and stats["image_tokens"] == 16
    text = inputs["input_ids"].shape[1] - 16
    assert stats["tokens"] == [text + v for v in expected] + [text + expected[-1]]
    assert stats["removed"] == [a - b for a, b in zip([16] + expected[:-1], expected, strict=True)]
    assert logits.shape[1] == text + expected[-1] and stats["kept"].shape == (2, text + expected[-1])
    # the schedules of core.visual_tokens give these counts
    schedule = {"fastv": [fastv_keep_count(16, 1 - 0.25)], "pyramiddrop": pyramid_schedule(16, [1, 3], 0.5),
                "dart": [dart_keep_count(8, 1, 1)]}[name]
    assert sorted(set(expected) - {16}, reverse=True) == schedule
    assert 0 < stats["macs"] < unreduced_macs(inputs)


# --- generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_generation_with_the_cache_equals_generation_without(attn, name):
    check_cache_equals_no_cache(generate, make_llava(attn), prompts(), name, REDUCING[name][0])


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_a_padded_batch_gives_each_prompt_what_it_gets_alone(attn, name):
    model = tokenreduce.apply(make_llava(attn), name, **REDUCING[name][0])
    check_batch_equals_each_alone(generate, model, prompts())


@pytest.mark.parametrize("attn", IMPLS)
def test_without_the_decode_mask_correction_the_padded_batch_is_wrong(attn, monkeypatch):
    """The control of the test above: the decode steps' mask columns must follow the kept positions."""
    model, inputs = make_llava(attn), prompts()
    tokenreduce.apply(model, "fastv", **REDUCING["fastv"][0])
    check_batch_is_wrong_once_broken(
        generate, model, inputs, 1,
        lambda: monkeypatch.setattr(hf_vlm.LayerHook, "decode", lambda self, run, hidden, kwargs: kwargs))


def test_a_cache_filled_by_a_reduced_forward_continues_by_hand():
    """A plain forward with use_cache returns a cache the next forward continues (not only generate)."""
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, "fastv", **REDUCING["fastv"][0])
    tokens, logits = generate(model, inputs)
    step, next_logits, _, _ = continue_by_hand(model, inputs, banned=[IMAGE])  # generate suppresses IMAGE
    assert torch.equal(step[:, 0], tokens[:, 0])
    torch.testing.assert_close(next_logits, logits[:, 1], atol=1e-5, rtol=1e-5)


# --- selections against plain references -----------------------------------------------------------
def reference_keep(scores, image, keep):
    """Plain loop: per sample, every non-image position and the `keep` image positions of highest
    score (ties to the lower position), ascending."""
    kept = []
    for b in range(scores.shape[0]):
        positions = [j for j in range(scores.shape[1]) if image[b, j]]
        ranked = sorted(positions, key=lambda j: (-float(scores[b, j]), j))[:keep]
        kept.append(sorted([j for j in range(scores.shape[1]) if not image[b, j]] + ranked))
    return torch.tensor(kept)


def eager_attention_rows(inputs, layer):
    """The last token's attention in `layer` of the unpatched eager model, averaged over heads."""
    model = make_llava("eager")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    return attentions[layer][:, :, -1, :].mean(dim=1)  # [B, N]; the last token is real under left padding


@pytest.mark.parametrize("attn", IMPLS)
def test_fastv_selection_equals_a_plain_loop_reference(attn):
    inputs = prompts()
    image = inputs["input_ids"] == IMAGE
    expected = reference_keep(eager_attention_rows(inputs, 1), image, 4)  # K=2 ranks by layer K-1 = 1
    model = tokenreduce.apply(make_llava(attn), "fastv", layer=2, keep=0.25)
    with torch.no_grad():
        model(**inputs)
    assert torch.equal(tokenreduce.stats(model)["kept"], expected)


@pytest.mark.parametrize("attn", IMPLS)
def test_pyramiddrop_ranks_with_the_stage_layers_own_attention(attn):
    inputs = prompts()
    image = inputs["input_ids"] == IMAGE
    expected = reference_keep(eager_attention_rows(inputs, 2), image, 4)  # one stage at layer 2: its own attention
    model = tokenreduce.apply(make_llava(attn), "pyramiddrop", layers=[2], ratio=0.25)
    with torch.no_grad():
        model(**inputs)
    assert torch.equal(tokenreduce.stats(model)["kept"], expected)


def reference_dart(inputs, layer, budget, image_pivots, text_pivots):
    """DART by plain loops on the unpatched model: layer-1's input (hooked) gives the keys (its
    k_proj after input_layernorm and the rotary embedding, heads side by side, L1 norms) and its
    output through the final norm gives the states compared by cosine similarity."""
    model = make_llava("eager")
    lm = model.model.language_model
    seen = {}
    hook = lm.layers[layer - 1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=args[0], pe=kwargs["position_embeddings"]), with_kwargs=True)
    out_hook = lm.layers[layer - 1].register_forward_hook(lambda m, args, out: seen.update(y=out))
    with torch.no_grad():
        model(**inputs)
        hook.remove(), out_hook.remove()
        source = lm.layers[layer - 1]
        x = source.input_layernorm(seen["x"])
        b, n, _ = x.shape
        k = source.self_attn.k_proj(x).view(b, n, -1, 8).transpose(1, 2)
        cos, sin = seen["pe"]
        k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(k, k, cos, sin)[0]
        norms = k.transpose(1, 2).reshape(b, n, -1).abs().sum(-1)
        states = torch.nn.functional.normalize(lm.norm(seen["y"]), dim=-1)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    kept = []
    for s in range(b):
        image = [j for j in range(n) if ids[s, j] == IMAGE]
        text = [j for j in range(n) if j > image[-1] and valid[s, j]]
        row = norms[s].tolist()
        ipiv = sorted(image, key=lambda j: (-row[j], j))[:image_pivots]
        tpiv = sorted(text, key=lambda j: (-row[j], j))[:text_pivots]
        taken, free = set(ipiv), [j for j in image if j not in ipiv]
        quota = budget // (image_pivots + text_pivots)
        for p in sorted(ipiv + tpiv):
            sims = (states[s] @ states[s, p]).tolist()
            chosen = sorted(free, key=lambda j: (sims[j], j))[:quota]
            taken.update(chosen)
            free = [j for j in free if j not in chosen]
        kept.append(sorted([j for j in range(n) if ids[s, j] != IMAGE] + list(taken)))
    return torch.tensor(kept)


@pytest.mark.parametrize("attn", IMPLS)
def test_dart_selection_equals_a_plain_loop_reference(attn):
    inputs = prompts()
    params = REDUCING["dart"][0]
    expected = reference_dart(inputs, **params)
    model = tokenreduce.apply(make_llava(attn), "dart", **params)
    with torch.no_grad():
        model(**inputs)
    assert torch.equal(tokenreduce.stats(model)["kept"], expected)


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_sdpa_and_eager_select_the_same_tokens(name):
    inputs, kept = prompts(), []
    for attn in IMPLS:
        model = tokenreduce.apply(make_llava(attn), name, **REDUCING[name][0])
        with torch.no_grad():
            model(**inputs)
        kept.append(tokenreduce.stats(model)["kept"])
    assert torch.equal(kept[0], kept[1])
    assert not torch.equal(kept[0][:, :], torch.arange(kept[0].shape[1]).expand_as(kept[0]))  # it selected


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"num_beams": 2}, "num_beams=2"),
    ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences=2"),
    ({"prefill_chunk_size": 4}, "prefill_chunk_size=4"),
    ({"cache_implementation": "static"}, "cache_implementation='static'"),
])
def test_generate_refuses_before_any_compute(kwargs, words):
    check_generate_refused_before_any_compute(tokenreduce.apply(make_llava(), "fastv"), kwargs, words)


def test_forward_refusals_come_before_any_compute():
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, "fastv")
    counter = compute_counter(model)
    with pytest.raises(ConfigError, match="labels.*allowed: labels=None"):
        model(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ConfigError, match="output_attentions=True"):
        model(**inputs, output_attentions=True)
    foreign = transformers.DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        make_llava()(**inputs, cache=foreign)
    with pytest.raises(ConfigError, match="non-empty cache not filled by a reduced prefill"):
        model(input_ids=inputs["input_ids"][:, -1:], cache=foreign)
    assert counter.calls == 0


def test_dart_budget_larger_than_the_image_is_refused_before_any_compute():
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, "dart", layer=2, budget=128)  # keeps 132 of 16
    counter = compute_counter(model)
    with pytest.raises(ConfigError, match="dart: budget=128 .* keeps 132 image tokens, but each sample has 16"):
        model(**inputs)
    assert counter.calls == 0


@pytest.mark.parametrize("name, params, words", [
    ("fastv", {"keep": 1.5}, r"fastv: keep=1.5 is invalid; allowed: a number in \[0, 1\]"),
    ("fastv", {"layer": 0}, "fastv: layer=0 is invalid; allowed: an integer >= 1"),
    ("fastv", {"layer": 5}, r"fastv: layer=5 is invalid for LlavaForConditionalGeneration, whose language model has "
                            r"5 decoder layers; allowed: an integer in \[1, 4\]"),
    ("pyramiddrop", {"layers": "abc"}, "pyramiddrop: layers='abc' is invalid; allowed: "),
    ("pyramiddrop", {"layers": [3, 2]}, r"pyramiddrop: layers=\[3, 2\] is invalid; allowed: a non-empty, strictly"),
    ("pyramiddrop", {"layers": [1, 2], "ratio": [0.5]}, r"ratio=\[0.5\] is invalid"),
    ("pyramiddrop", {}, r"pyramiddrop: layers=\[8, 16, 24\] is invalid for LlavaForConditionalGeneration, whose "
                       r"language model has 5 decoder layers; allowed: integers in \[1, 4\]"),
    ("dart", {"image_pivots": 0, "text_pivots": 0}, "at least one pivot"),
])
def test_bad_parameters_are_refused_at_apply(name, params, words):
    model = make_llava()
    with pytest.raises(ConfigError, match=words):
        tokenreduce.apply(model, name, **params)
    assert type(model) is transformers.LlavaForConditionalGeneration and not hasattr(model, "_tokenreduce")


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_a_vision_transformer_refuses_the_language_model_reducers(name):
    import timm

    vit = timm.create_model("test_vit", pretrained=False)
    with pytest.raises(ConfigError, match=f"{name}: drops visual tokens inside the language model"):
        tokenreduce.apply(vit, name)


def test_the_adapter_claims_llava_and_refuses_other_attention():
    model = make_llava()
    assert isinstance(adapter_for(model), hf_vlm.VLMAdapter)
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='flex_attention'"):
        tokenreduce.apply(model, "fastv")


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("padded", [True, False])
def test_the_recomputed_anchor_row_equals_eager_attention(attn, padded):
    """The anchor's attention row, recomputed from a layer's input (sdpa returns no weights), equals the
    row eager attention returns, for anchors before the end too (where the mask row matters)."""
    inputs = prompts() if padded else solo(prompts(), 0)
    model, reference = make_llava(attn), make_llava("eager")
    layer = model.model.language_model.layers[1]
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], kw=kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        hook.remove()
        expected = reference(**inputs, output_attentions=True).attentions[1]
        b, n = inputs["input_ids"].shape
        for anchor in ([n - 1] * b, [n - 4, 5][:b], [2] * b):
            anchor = torch.tensor(anchor)
            got = hf_vlm.anchor_attention(layer, seen["x"], seen["kw"]["attention_mask"],
                                          *seen["kw"]["position_embeddings"], anchor)
            want = expected[torch.arange(b), :, anchor].unsqueeze(2)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# --- PyramidDrop with renumbered positions ------------------------------------------------------------
RENUMBERED = {"layers": [1, 3], "ratio": 0.5, "renumber": True}


def test_renumbered_positions_are_contiguous_after_each_drop():
    """From each stage layer on, the kept tokens move down by the tokens dropped before them: a plain
    forward numbers the padded rows 0..N-1, so the rows become 0..M-1, with the rotary (cos, sin) of
    those positions; the logits differ from the kept numbering's."""
    model, inputs = make_llava(), prompts()
    lm = model.model.language_model
    with torch.no_grad():
        kept_numbering = tokenreduce.apply(model, "pyramiddrop", **{**RENUMBERED, "renumber": False})(**inputs).logits
    tokenreduce.remove(model)
    tokenreduce.apply(model, "pyramiddrop", **RENUMBERED)
    seen = {}
    hooks = [lm.layers[i].register_forward_pre_hook(
        lambda m, args, kwargs, i=i: seen.update({i: (kwargs["position_ids"], kwargs["position_embeddings"])}),
        with_kwargs=True) for i in (1, 3)]
    with torch.no_grad():
        logits = model(**inputs).logits
    for hook in hooks:
        hook.remove()
    assert [seen[i][0].shape[1] for i in (1, 3)] == [inputs["input_ids"].shape[1] - 8, inputs["input_ids"].shape[1] - 12]
    for positions, (cos, sin) in seen.values():
        assert torch.equal(positions, torch.arange(positions.shape[1]).expand_as(positions))
        expected_cos, expected_sin = lm.rotary_emb(logits, positions)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    assert not torch.allclose(logits, kept_numbering, atol=1e-4)


@pytest.mark.parametrize("attn", IMPLS)
def test_renumbered_generation_with_the_cache_equals_generation_without(attn):
    check_cache_equals_no_cache(generate, make_llava(attn), prompts(), "pyramiddrop", RENUMBERED)


@pytest.mark.parametrize("attn", IMPLS)
def test_renumbered_padded_batch_gives_each_prompt_what_it_gets_alone(attn):
    model = tokenreduce.apply(make_llava(attn), "pyramiddrop", **RENUMBERED)
    check_batch_equals_each_alone(generate, model, prompts())


def test_renumbering_nothing_dropped_is_the_unpatched_model():
    check_unpatched_when_nothing_is_reduced(generate, make_llava(), prompts(), "pyramiddrop",
                                            {**RENUMBERED, "ratio": 1.0})
