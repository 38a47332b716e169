"""Image features shrunk between the vision tower and the language model of a transformers
LlavaForConditionalGeneration (VisionZip, PruMerge, PruMerge+; docs/vlm.md, placement (b)), on the
tiny random LLaVA of tests/vlm_checks.py: keeping every token is the unpatched model;
`remove` restores it; the image tokens entering the language model are the method's count; the
reduced model equals a hand-built reference (features reduced by core.visual_tokens, placeholder
runs cut by hand, the unpatched model called with them); greedy generation with the KV cache equals
generation without it; a left-padded batch gives each prompt what it gets alone (also when the two
images keep different counts, so the batch is re-left-padded); the recomputed CLS attention equals
eager attention's; and every refusal comes before any compute."""

from __future__ import annotations

import re

import pytest
import torch
from vlm_checks import (
    IMAGE,
    IMPLS,
    PAD,
    check_batch_equals_each_alone,
    check_batch_is_wrong_once_broken,
    check_cache_equals_no_cache,
    check_generate_refused_before_any_compute,
    check_generation_equals_the_reference,
    check_unpatched_when_nothing_is_reduced,
    compute_counter,
    continue_by_hand,
    generate_no_early_stop,
    logits_and_language_model_width,
    make_llava,
    prompts,
    reference_inputs,
    uneven_prompts,
    unreduced_macs,
)

import tokenreduce
from tokenreduce.adapters import hf_vlm
from tokenreduce.core.visual_tokens import iqr_outlier_count, prumerge, visionzip
from tokenreduce.errors import ConfigError

transformers = pytest.importorskip("transformers")

PATCHES = 16  # the tiny tower's patch tokens per image (16x16 pixels, patches of 4), one CLS before them
REDUCING = {
    "visionzip": {"dominant": 4, "contextual": 2},  # CLS + 3 dominant patches + 2 contextual = 6 per image
    "prumerge": {"neighbours": 4},
    "prumerge+": {"neighbours": 4},
}
KEEP_ALL = {"dominant": PATCHES, "contextual": 0, "keep_cls": False}  # visionzip keeping every patch, no CLS


def ours(hook) -> bool:
    return isinstance(hook, hf_vlm.ProjectorHook) or isinstance(getattr(hook, "__self__", None), hf_vlm.FeatureHook)


def feature_hooks_gone(model) -> bool:
    """No hook of this adapter on the tower's layers or the projector (transformers adds its own
    output-capturing hooks to the tower's layers), and the class's get_image_features again."""
    modules = [*model.model.vision_tower.encoder.layers, model.model.multi_modal_projector]
    return (not any(ours(h) for m in modules for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))
            and "get_image_features" not in vars(model.model))


# --- the hand-built reference ------------------------------------------------------------------------
def reference_features(model, pixel_values, name, params):
    """Each image's reduced features by hand: the unpatched tower's hidden states, the signals from the
    layers' own projections, the rule of core.visual_tokens, the projector, cut per image."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    with torch.no_grad():
        states = tower(pixel_values, output_hidden_states=True).hidden_states
        y = states[-2]  # LLaVA's vision_feature_layer -2: the output of layers[-2]
        if name == "visionzip":
            layer = layers[-2]
            h = layer.layer_norm1(states[-3])
            i, n, _ = h.shape
            heads = layer.self_attn.num_heads
            q = layer.self_attn.q_proj(h).view(i, n, heads, -1).transpose(1, 2)
            k = layer.self_attn.k_proj(h).view(i, n, heads, -1).transpose(1, 2)
            attn = (q @ k.transpose(2, 3) * layer.self_attn.scale).softmax(-1)[:, :, 0]  # [I, H, N]
            params = {"dominant": 54, "contextual": 10, "keep_cls": True, "merge": "mean", **params}
            tokens, _ = visionzip(attn, k, y, params["dominant"], params["contextual"], prefix=1,
                                  keep_prefix=params["keep_cls"], merge=params["merge"])
            counts = [tokens.shape[1]] * tokens.shape[0]
        else:
            layer = layers[-1]  # the layer after the feature layer: its q/k projections taken whole
            h = layer.layer_norm1(y)
            q, k = layer.self_attn.q_proj(h), layer.self_attn.k_proj(h)
            a = (q @ k.transpose(1, 2) * k.shape[-1] ** -0.5).softmax(-1)[:, 0]  # [I, N]
            out = prumerge(a, k, y, plus=name == "prumerge+", prefix=1, **params)
            tokens, counts = out.tokens, out.valid.sum(1).tolist()
            assert counts == (iqr_outlier_count(a[:, 1:]).clamp(min=1) + 1).tolist() or name == "prumerge+"
        projected = model.model.multi_modal_projector(tokens)
    return [projected[i, :c] for i, c in enumerate(counts)]


# --- exactness, removal, counts ----------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
def test_keeping_every_token_equals_the_unpatched_model(attn):
    model = make_llava(attn)
    check_unpatched_when_nothing_is_reduced(generate_no_early_stop, model, prompts(), "visionzip", KEEP_ALL)
    stats = tokenreduce.stats(model)
    assert stats["visual_tokens"] == [PATCHES] * 5 and stats["visual_per_image"] == [PATCHES, PATCHES]


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_remove_restores_the_model(name):
    model, inputs = make_llava(), prompts()
    cls = type(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        tokenreduce.apply(model, name, **REDUCING[name])
        assert model.model.get_image_features.__wrapped__ is not None
        reduced = model(**inputs).logits
        assert reduced.shape[1] < expected.shape[1]
        tokenreduce.remove(model)
        assert type(model) is cls and not hasattr(model, "_tokenreduce") and feature_hooks_gone(model)
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_image_tokens_entering_the_language_model_are_the_methods_count(name):
    model, inputs = make_llava(), uneven_prompts()
    tokenreduce.apply(model, name, **REDUCING[name])
    logits, entering = logits_and_language_model_width(model, inputs)
    stats = tokenreduce.stats(model)
    expected = {"visionzip": [6, 6], "prumerge": [2, 3], "prumerge+": [5, 9]}[name]
    assert stats["visual_per_image"] == expected and stats["visual_per_sample"] == expected
    assert stats["visual_tokens"] == [max(expected)] * 5 and stats["image_tokens"] == PATCHES
    assert stats["image_patches"] == PATCHES
    real = inputs["attention_mask"].sum(1) - PATCHES + torch.tensor(expected)  # each sample's tokens after the cut
    width = int(real.max())
    assert entering == width and logits.shape[1] == width and stats["tokens"] == [width] * 6
    assert stats["removed"] == [inputs["input_ids"].shape[1] - width, 0, 0, 0, 0]
    assert stats["kept"].shape == (2, width) and ((stats["kept"] < 0).sum(1) == width - real).all()
    assert 0 < stats["macs"] < unreduced_macs(inputs)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_the_reduced_model_equals_a_hand_built_reference(attn, name):
    """Features reduced by hand with core.visual_tokens, placeholder runs cut by hand, the unpatched
    model called with those features and tokens: the same logits."""
    reference, inputs = make_llava(attn), uneven_prompts()
    hand = reference_inputs(inputs, reference_features(reference, inputs["pixel_values"], name, REDUCING[name]))
    with torch.no_grad():
        expected = reference(**hand).logits
        model = tokenreduce.apply(make_llava(attn), name, **REDUCING[name])
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    kept = tokenreduce.stats(model)["kept"]
    assert torch.equal(inputs["input_ids"].gather(1, kept.clamp_min(0)).masked_fill(kept < 0, PAD), hand["input_ids"])


# --- generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_generation_with_the_cache_equals_generation_without(attn, name):
    check_cache_equals_no_cache(generate_no_early_stop, make_llava(attn), uneven_prompts(), name, REDUCING[name])


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", sorted(REDUCING))
@pytest.mark.parametrize("make_inputs", [prompts, uneven_prompts], ids=["even", "uneven"])
def test_a_padded_batch_gives_each_prompt_what_it_gets_alone(attn, name, make_inputs):
    model = tokenreduce.apply(make_llava(attn), name, **REDUCING[name])
    check_batch_equals_each_alone(generate_no_early_stop, model, make_inputs())


def test_generation_equals_the_reference_generation():
    """generate() on the reduced model gives the unpatched model's generation from the hand-shortened
    prompt and the hand-reduced features."""
    reference, inputs = make_llava(), uneven_prompts()
    features = reference_features(reference, inputs["pixel_values"], "prumerge+", REDUCING["prumerge+"])
    model = tokenreduce.apply(make_llava(), "prumerge+", **REDUCING["prumerge+"])
    check_generation_equals_the_reference(reference, features, model, inputs)


@pytest.mark.parametrize("attn", IMPLS)
def test_without_the_decode_correction_the_padded_batch_is_wrong(attn, monkeypatch):
    """The control of the tests above: decode steps must get the shortened prefill's mask and positions."""
    model, inputs = make_llava(attn), uneven_prompts()
    tokenreduce.apply(model, "prumerge+", **REDUCING["prumerge+"])
    check_batch_is_wrong_once_broken(
        generate_no_early_stop, model, inputs, 0,
        lambda: monkeypatch.setattr(hf_vlm.ReducedVLM, "_tr_continue", lambda self, entry, arguments, cache: arguments))


def test_a_cache_filled_by_a_reduced_forward_continues_by_hand():
    """A plain forward with use_cache returns a cache the next forward continues, given the mask and
    positions in the original prompt's numbering (as generate gives them)."""
    model, inputs = make_llava(), uneven_prompts()
    tokenreduce.apply(model, "prumerge+", **REDUCING["prumerge+"])
    tokens, logits = generate_no_early_stop(model, inputs)
    # generate_no_early_stop suppresses IMAGE and the end-of-sequence token
    step, next_logits, cache, mask = continue_by_hand(model, inputs,
                                                      banned=[IMAGE, model.generation_config.eos_token_id])
    with torch.no_grad(), pytest.raises(ConfigError, match="an attention_mask of 3 columns"):
        model(input_ids=step, attention_mask=mask[:, :3], cache=cache)
    assert torch.equal(step[:, 0], tokens[:, 0])
    torch.testing.assert_close(next_logits, logits[:, 1], atol=1e-5, rtol=1e-5)


# --- signals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
def test_the_recomputed_cls_attention_equals_eager_attention(attn):
    model, reference = make_llava(attn), make_llava("eager")
    pixels = prompts()["pixel_values"]
    with torch.no_grad():
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        expected = reference.model.vision_tower(pixels, output_attentions=True).attentions[-2][:, :, 0]
        got, keys = hf_vlm.cls_attention(model.model.vision_tower.encoder.layers[-2], states[-3])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert keys.shape == (2, 4, PATCHES + 1, 8)


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, words", [
    ("visionzip", {"dominant": -1}, "visionzip: dominant=-1 is invalid; allowed: an integer >= 0"),
    ("visionzip", {"dominant": 0}, "dominant=0 with keep_cls=True is invalid"),
    ("visionzip", {"keep_cls": "yes"}, "visionzip: keep_cls='yes' is invalid; allowed: true or false"),
    ("visionzip", {"merge": "max"}, "visionzip: merge='max' is invalid; allowed: 'mean', 'target_plus_mean'"),
    ("visionzip", {}, r"visionzip: dominant=54 \(the CLS token and 53 patches\) \+ contextual=10 is more than the "
                      r"16 image tokens \(patches\) of LlavaForConditionalGeneration's vision tower; allowed: "
                      r"dominant - 1 \+ contextual <= 16"),
    ("visionzip", {"dominant": 15, "contextual": 2, "keep_cls": False}, "dominant=15 \\+ contextual=2 is more than"),
    ("prumerge", {"neighbours": 16}, "prumerge: neighbours=16 is more than the 15 other patches"),
    ("prumerge+", {"neighbours": -2}, r"prumerge\+: neighbours=-2 is invalid"),
])
def test_bad_parameters_are_refused_at_apply(name, params, words):
    model = make_llava()
    with pytest.raises(ConfigError, match=words):
        tokenreduce.apply(model, name, **params)
    assert type(model) is transformers.LlavaForConditionalGeneration and feature_hooks_gone(model)


def test_prumerge_needs_a_layer_after_the_feature_layer():
    model = make_llava()
    model.config.vision_feature_layer = -1
    with pytest.raises(ConfigError, match="prumerge: .* reads its image features from the vision tower's last layer"):
        tokenreduce.apply(model, "prumerge")
    tokenreduce.apply(model, "visionzip", dominant=4, contextual=2)  # visionzip reads the feature layer itself
    with torch.no_grad():
        model(**prompts())
    assert tokenreduce.stats(model)["visual_per_image"] == [6, 6]


@pytest.mark.parametrize("kwargs, words", [
    ({"num_beams": 2}, "num_beams=2"),
    ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences=2"),
    ({"cache_implementation": "static"}, "cache_implementation='static'"),
    ({"vision_feature_layer": -1}, "vision_feature_layer=-1"),
])
def test_generate_refuses_before_any_compute(kwargs, words):
    model = tokenreduce.apply(make_llava(), "visionzip", dominant=4, contextual=2)
    check_generate_refused_before_any_compute(model, kwargs, words)


def test_forward_refusals_come_before_any_compute():
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, "prumerge", neighbours=4)
    counter = compute_counter(model)
    with pytest.raises(ConfigError, match="labels.*allowed: labels=None"):
        model(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ConfigError, match="output_hidden_states=True"):
        model(**inputs, output_hidden_states=True)
    with pytest.raises(ConfigError, match="vision_feature_select_strategy='full'"):
        model(**inputs, vision_feature_select_strategy="full")
    with pytest.raises(ConfigError, match="image_sizes"):
        model(**inputs, image_sizes=torch.tensor([[16, 16], [16, 16]]))
    with pytest.raises(ConfigError, match="inputs_embeds without input_ids"):
        model(inputs_embeds=torch.zeros(2, 4, 32), pixel_values=inputs["pixel_values"])
    assert counter.calls == 0


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_a_vision_transformer_refuses_the_boundary_reducers(name):
    import timm

    vit = timm.create_model("test_vit", pretrained=False)
    with pytest.raises(ConfigError, match=re.escape(name) + ": shrinks the image features between the vision tower"):
        tokenreduce.apply(vit, name)


def test_two_images_side_by_side_each_keep_their_own_count():
    """LLaVA-1.5's runs are V long each, so two images with no text between them are two runs."""
    placeholder = torch.tensor([[False, True, True, True, True, False], [True, True, False, False, False, False]])
    cut = hf_vlm.cut_placeholders(placeholder, [1, 2, 0], equal_runs=True)  # runs: 0-1, 2-3 of row 0, row 1
    assert cut.tolist() == [[False, False, True, False, False, False], [True, True, False, False, False, False]]
    with pytest.raises(ConfigError, match="one per image, in order, with text between two images"):
        hf_vlm.cut_placeholders(placeholder, [1, 2, 0], equal_runs=False)  # two segments for three images
    segments = hf_vlm.cut_placeholders(placeholder, [3, 1], equal_runs=False)  # runs of 4 and 2
    assert segments.tolist() == [[False, False, False, False, True, False], [False, True, False, False, False, False]]
