"""SparseVLM inside the language model of a transformers LlavaForConditionalGeneration (placement (c),
docs/vlm.md), on the tiny random LLaVA of vlm_checks: zero reduction is the unpatched model; `remove`
restores it; the image tokens per layer follow the counts; greedy generation with the KV cache equals
generation without it; a left-padded batch, whose samples keep different numbers of image tokens
(padding slots), gives each prompt what it gets alone; the raters, scores, counts and recycled
tokens equal a plain-loop reference on the unpatched model; sdpa and eager select alike; the text
rows' attention equals eager attention; and the refusals come before any compute."""

from __future__ import annotations

import math

import pytest
import torch
from test_visual_tokens import ref_dpc
from vlm_checks import (
    IMAGE,
    IMPLS,
    PAD,
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
from tokenreduce.adapters import hf_vlm
from tokenreduce.core.visual_tokens import sparsevlm_keep_count, sparsevlm_recycle_counts
from tokenreduce.errors import ConfigError
from tokenreduce.reducers import vlm as vlm_reducers

transformers = pytest.importorskip("transformers")

# the rank-adaptive count (ranks of 1 to 3 raters: 2 image tokens per rank), half the pruned ones
# recycled: the two prompts keep different numbers of image tokens, so the batch has padding slots
ADAPTIVE = {"layers": [1, 2], "scale": 2.0, "recycle": 0.5, "clusters": 0.5}
# fixed counts (scale 0, bias k): 8 rated + 1 recycled from layer 2 on, 4 + 1 from layer 4 on
FIXED = {"layers": [1, 3], "scale": 0.0, "bias": [8, 4]}
FIXED_VISUAL = [16, 16, 9, 9, 5]
ZERO = {"layers": [1, 3], "scale": 0.0, "bias": 16}  # keeps all 16 image tokens at both layers


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def even_prompts():
    """Two prompts of the same length without padding (sdpa then passes no mask), with 3 and 2 text tokens
    after the image: they keep different numbers of image tokens, so the batch gets padding slots."""
    inputs = prompts()
    ids = torch.tensor([[1, 5, 6] + [IMAGE] * 16 + [7, 8, 9], [4, 5, 2, 3] + [IMAGE] * 16 + [7, 8]])
    return {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


# --- exactness, removal, counts ----------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
def test_zero_reduction_equals_the_unpatched_model(attn):
    model = make_llava(attn)
    check_unpatched_when_nothing_is_reduced(generate, model, prompts(), "sparsevlm", ZERO)
    assert tokenreduce.stats(model)["visual_tokens"] == [16] * 5


def test_remove_restores_the_model():
    model, inputs = make_llava(), prompts()
    cls = type(model)
    expected = run(model, inputs)
    tokenreduce.apply(model, "sparsevlm", **ADAPTIVE)
    assert run(model, inputs).shape[1] < expected.shape[1]  # the logits are those of the kept positions
    tokenreduce.remove(model)
    assert type(model) is cls and not hasattr(model, "_tokenreduce") and not hasattr(model, "token_reducer")
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
    assert torch.equal(run(model, inputs), expected)


def test_visual_tokens_per_layer_follow_the_counts():
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, "sparsevlm", **FIXED)
    logits = run(model, inputs)
    stats = tokenreduce.stats(model)
    # the rules of core.visual_tokens give these counts: k rated, then the clusters of the recycled ones
    first = sparsevlm_keep_count(16, 3, 0.0, 8)
    second = sparsevlm_keep_count(first + 1, 3, 0.0, 4)
    assert (first, second) == (8, 4)
    assert sparsevlm_recycle_counts(16 - 8) == (3, 1) and sparsevlm_recycle_counts(9 - 4) == (2, 1)
    assert stats["visual_tokens"] == FIXED_VISUAL and stats["image_tokens"] == 16
    assert stats["visual_per_sample"] == [5, 5]
    text = inputs["input_ids"].shape[1] - 16
    assert stats["tokens"] == [text + v for v in FIXED_VISUAL] + [text + 5]
    assert stats["removed"] == [a - b for a, b in zip([16] + FIXED_VISUAL[:-1], FIXED_VISUAL, strict=True)]
    assert logits.shape[1] == text + 5 and stats["kept"].shape == (2, text + 5)
    assert 0 < stats["macs"] < unreduced_macs(inputs)
    # the reducer's upper bounds per stage are these counts when they are fixed by keep
    assert tokenreduce.apply(make_llava(), "sparsevlm", layers=[1, 3], keep=[8, 4]).token_reducer.visual_counts(16) \
        == [9, 5]


# --- generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("params", [ADAPTIVE, FIXED], ids=["adaptive", "fixed"])
def test_generation_with_the_cache_equals_generation_without(attn, params):
    check_cache_equals_no_cache(generate, make_llava(attn), prompts(), "sparsevlm", params)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("batch", [prompts, even_prompts], ids=["left-padded", "unpadded"])
def test_a_batch_gives_each_prompt_what_it_gets_alone(attn, batch):
    model, inputs = make_llava(attn), batch()
    tokenreduce.apply(model, "sparsevlm", **ADAPTIVE)
    run(model, inputs)
    stats = tokenreduce.stats(model)
    fewer = min(range(2), key=lambda b: stats["visual_per_sample"][b])
    assert stats["visual_per_sample"][0] != stats["visual_per_sample"][1]  # so the batch holds padding slots
    assert (stats["kept"][fewer] == -1).any() and not (stats["kept"][1 - fewer] == -1).any()
    check_batch_equals_each_alone(generate, model, inputs)


@pytest.mark.parametrize("attn", IMPLS)
def test_without_masking_the_padding_slots_the_batch_is_wrong(attn, monkeypatch):
    """The control of the test above: the padding slots of the sample that keeps fewer must stay masked
    (unpadded prompts: in a left-padded sample the slots copy a padding position, masked anyway)."""
    model, inputs = make_llava(attn), even_prompts()
    tokenreduce.apply(model, "sparsevlm", **ADAPTIVE)
    run(model, inputs)
    fewer = min(range(2), key=lambda b: tokenreduce.stats(model)["visual_per_sample"][b])
    check_batch_is_wrong_once_broken(
        generate, model, inputs, fewer,
        lambda: monkeypatch.setattr(hf_vlm, "_mask_padding_slots", lambda mask, pad, queries, prefill: mask))


def test_a_cache_filled_by_a_reduced_forward_continues_by_hand():
    """A plain forward with use_cache returns a cache (with padding slots) the next forward continues."""
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, "sparsevlm", **ADAPTIVE)
    tokens, logits = generate(model, inputs)
    step, next_logits, _, _ = continue_by_hand(model, inputs, banned=[IMAGE])
    assert torch.equal(step[:, 0], tokens[:, 0])
    torch.testing.assert_close(next_logits, logits[:, 1], atol=1e-5, rtol=1e-5)


# --- the selection against a plain-loop reference ------------------------------------------------------
def reference_sparsevlm(inputs, layer, scale, bias, recycle, clusters, raters):
    """One SparseVLM stage by plain loops on the unpatched eager model: the text tokens (real prompt
    tokens after the image), the raters (relevance from the embeddings, or from layer `layer`'s attention),
    each image token's score (mean attention from the raters at `layer`, averaged over heads), the rank
    of the raters-by-image matrix, the count, the recycled tokens (DPC-KNN on layer `layer`'s output,
    cluster means at the centres). Returns per sample: kept positions, their states, rated count, clusters."""
    model = make_llava("eager")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[layer].double()  # [B, H, N, N]
    embeddings, output = out.hidden_states[0].double(), out.hidden_states[layer + 1]
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    b_count, heads, n, _ = attn.shape
    result = []
    for b in range(b_count):
        image = [j for j in range(n) if ids[b, j] == IMAGE]
        text = [j for j in range(n) if j > image[-1] and valid[b, j]]
        if raters == "embeddings":
            relevance = []
            for t in text:
                total = 0.0
                for v in image:
                    logits = [float(embeddings[b, v] @ embeddings[b, u]) for u in text]
                    top = max(logits)
                    total += math.exp(logits[text.index(t)] - top) / sum(math.exp(x - top) for x in logits)
                relevance.append(total / len(image))
        else:
            relevance = [sum(float(attn[b, h, t, v]) for h in range(heads) for v in image) / (heads * len(image))
                         for t in text]
        mean = sum(relevance) / len(relevance)
        chosen_raters = [t for t, r in zip(text, relevance, strict=True) if r >= mean]
        matrix = [[sum(float(attn[b, h, t, v]) for h in range(heads)) / heads for v in image] for t in chosen_raters]
        rank = int(torch.linalg.matrix_rank(torch.tensor(matrix, dtype=torch.float32)))
        score = {v: sum(row[i] for row in matrix) / len(matrix) for i, v in enumerate(image)}
        k = len(image) if rank >= len(image) else min(max(math.floor(scale * rank + bias), 0), len(image))
        order = sorted(image, key=lambda v: (-score[v], v))
        pruned = order[k:]
        m = min(len(pruned), math.floor(recycle * len(pruned)) + 1) if pruned else 0
        c = min(m, math.floor(clusters * m) + 1) if m else 0
        states = {j: output[b, j].tolist() for j in range(n)}
        centres = []
        if m:
            centre_at, assignment = ref_dpc([states[j] for j in pruned[:m]], c)
            centres = [pruned[:m][i] for i in centre_at]
            for slot, centre in enumerate(centres):
                members = [states[pruned[i]] for i in range(m) if assignment[i] == slot]
                states[centre] = [sum(col) / len(members) for col in zip(*members, strict=True)]
        positions = sorted([j for j in range(n) if ids[b, j] != IMAGE] + order[:k] + centres)
        result.append((positions, [states[j] for j in positions], k, c))
    return result


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("raters", ["embeddings", "attention"])
def test_the_selection_equals_a_plain_loop_reference(attn, raters):
    inputs = prompts()
    params = {"scale": 2.0, "bias": 0.0, "recycle": 0.5, "clusters": 0.5}
    expected = reference_sparsevlm(inputs, 1, raters=raters, **params)
    model = tokenreduce.apply(make_llava(attn), "sparsevlm", layers=[1], raters=raters, **params)
    seen = {}
    hook = model.model.language_model.layers[2].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    run(model, inputs)
    hook.remove()
    stats = tokenreduce.stats(model)
    kept, width = stats["kept"], stats["kept"].shape[1]
    assert width == max(len(p) for p, _, _, _ in expected)
    for b, (positions, states, k, c) in enumerate(expected):
        pad = width - len(positions)
        assert kept[b].tolist() == [-1] * pad + positions
        real = inputs["attention_mask"][b, positions].bool()  # padding's states differ between sdpa and eager
        torch.testing.assert_close(seen["x"][b, pad:][real], torch.tensor(states)[real], atol=1e-5, rtol=1e-5)
        assert stats["visual_per_sample"][b] == k + c
        assert c >= 1 and any(n_c > 1 for n_c in [c for _, _, _, c in expected])  # clusters recycled
    assert stats["visual_tokens"] == [16, 16] + [max(k + c for _, _, k, c in expected)] * 3


def test_embedding_raters_are_chosen_once_and_found_again_at_later_layers(monkeypatch):
    """The reference chooses the raters once, from the language model's input; a later stage rates
    with the same text tokens (carried as marks through the cut)."""
    calls = []
    original = vlm_reducers.sparsevlm_keep

    def spy(text_attn, text, raters, *args, **kwargs):
        calls.append((text.clone(), raters.clone()))
        return original(text_attn, text, raters, *args, **kwargs)

    monkeypatch.setattr(vlm_reducers, "sparsevlm_keep", spy)
    model = tokenreduce.apply(make_llava(), "sparsevlm", **ADAPTIVE)
    run(model, prompts())
    (text_1, raters_1), (text_2, raters_2) = calls
    assert torch.equal(raters_1, raters_2) and torch.equal(text_1 >= 0, text_2 >= 0)
    assert not torch.equal(text_1, text_2)  # the same tokens at other positions of the shortened sequence


@pytest.mark.parametrize("params", [ADAPTIVE, FIXED, {**ADAPTIVE, "raters": "attention"}],
                         ids=["adaptive", "fixed", "attention-raters"])
def test_sdpa_and_eager_select_the_same_tokens(params):
    inputs, kept = prompts(), []
    for attn in IMPLS:
        model = tokenreduce.apply(make_llava(attn), "sparsevlm", **params)
        run(model, inputs)
        kept.append(tokenreduce.stats(model)["kept"])
    assert torch.equal(kept[0], kept[1])
    assert kept[0].shape[1] < inputs["input_ids"].shape[1]  # it selected


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("padded", [True, False])
def test_the_recomputed_text_rows_equal_eager_attention(attn, padded):
    """The text tokens' attention rows, recomputed from a layer's input (sdpa returns no weights), equal
    the rows eager attention returns."""
    inputs = prompts() if padded else solo(prompts(), 0)
    model, reference = make_llava(attn), make_llava("eager")
    layer = model.model.language_model.layers[1]
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], kw=kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        hook.remove()
        expected = reference(**inputs, output_attentions=True).attentions[1]
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        rows = hf_vlm.text_rows(ids == IMAGE, mask.bool())
        assert rows.tolist() == ([[19, 20, 21], [20, 21, -1]] if padded else [[19, 20, 21]])
        got = hf_vlm.query_attention(layer, seen["x"], seen["kw"]["attention_mask"],
                                     *seen["kw"]["position_embeddings"], rows.clamp_min(0))
        for b in range(ids.shape[0]):
            for i, t in enumerate(rows[b].tolist()):
                if t >= 0:
                    torch.testing.assert_close(got[b, :, i], expected[b, :, t], atol=1e-6, rtol=1e-5)


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, words", [
    ({"layers": [3, 2]}, r"sparsevlm: layers=\[3, 2\] is invalid; allowed: a non-empty, strictly increasing list"),
    ({"layers": []}, r"sparsevlm: layers=\[\] is invalid; allowed: a non-empty"),
    ({"layers": [-1, 2]}, r"sparsevlm: layers=\[-1, 2\] is invalid; allowed: a list of integers >= 0"),
    ({"layers": [1, 4]}, r"sparsevlm: layers=\[1, 4\] is invalid for LlavaForConditionalGeneration, whose language "
                         r"model has 5 decoder layers; allowed: integers in \[0, 3\]"),
    ({}, r"sparsevlm: layers=\[2, 6, 15, 19\] is invalid for LlavaForConditionalGeneration, .*allowed: integers in "
         r"\[0, 3\]"),
    ({"layers": [1], "recycle": 1.5}, r"sparsevlm: recycle=1.5 is invalid; allowed: a number in \[0, 1\]"),
    ({"layers": [1], "recycle": -0.1}, r"sparsevlm: recycle=-0.1 is invalid; allowed: a number in \[0, 1\]"),
    ({"layers": [1], "clusters": 0}, r"sparsevlm: clusters=0 is invalid; allowed: a number in \(0, 1\]"),
    ({"layers": [1], "clusters": 1.2}, r"sparsevlm: clusters=1.2 is invalid; allowed: a number in \(0, 1\]"),
    ({"layers": [1], "scale": -2.0}, r"sparsevlm: scale=-2.0 is invalid; allowed: a number >= 0"),
    ({"layers": [1, 2], "scale": [1.0]}, r"sparsevlm: scale=\[1.0\] is invalid; allowed: one number for every "
                                         r"layer, or a list of 2"),
    ({"layers": [1], "bias": float("inf")}, "sparsevlm: bias=inf is invalid; allowed: a number"),
    ({"layers": [1], "keep": 2.5}, "sparsevlm: keep=2.5 is invalid; allowed: an integer >= 0"),
    ({"layers": [1, 2], "keep": [4, 2, 1]}, r"sparsevlm: keep=\[4, 2, 1\] is invalid; allowed: one number"),
    ({"layers": [1], "raters": "text"}, "sparsevlm: raters='text' is invalid; allowed: 'embeddings', 'attention'"),
])
def test_bad_parameters_are_refused_at_apply(params, words):
    model = make_llava()
    with pytest.raises(ConfigError, match=words):
        tokenreduce.apply(model, "sparsevlm", **params)
    assert type(model) is transformers.LlavaForConditionalGeneration and not hasattr(model, "_tokenreduce")


def test_a_prompt_without_text_after_the_image_is_refused_before_any_compute():
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, "sparsevlm", **ADAPTIVE)
    ids = inputs["input_ids"].clone()
    ids[1] = torch.tensor([PAD] * 4 + [4, 5] + [IMAGE] * 16)  # the image last: no text token rates it
    counter = compute_counter(model)
    with pytest.raises(ConfigError, match=r"sparsevlm: samples \[1\] have no text token after their image; .*"
                                          "allowed: prompts with text after the image"):
        model(**{**inputs, "input_ids": ids, "attention_mask": (ids != PAD).long()})
    assert counter.calls == 0


def test_generate_refuses_beams_before_any_compute():
    check_generate_refused_before_any_compute(tokenreduce.apply(make_llava(), "sparsevlm", **ADAPTIVE),
                                              {"num_beams": 2}, "num_beams=2")


def test_a_vision_transformer_refuses_sparsevlm():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("test_vit", pretrained=False)
    with pytest.raises(ConfigError, match="sparsevlm: drops visual tokens inside the language model"):
        tokenreduce.apply(vit, "sparsevlm")
