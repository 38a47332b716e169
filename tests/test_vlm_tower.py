"""Tokens merged inside the CLIP vision tower of a transformers LlavaForConditionalGeneration
(placement (a), docs/vlm.md): a vision reducer (pitome, tome, tofu, ...) applied to the LLaVA model is
placed in its tower by the CLIP adapter (hf_clip), which returns the merged tokens at LLaVA's feature
layer; the placeholder runs are shortened as at the boundary (placement (b)). On the tiny random
LLaVA of tests/vlm_checks.py: zero reduction is the unpatched model; `remove` restores
it; the image tokens entering the language model are what the tower's reducer leaves at the feature
layer; the reduced model equals a hand-built reference; generation with the cache equals generation
without; a left-padded batch gives each prompt what it gets alone; refusals come before any compute.
Also hf_clip's answer to the hidden-state selection LLaVA asks of its tower."""

from __future__ import annotations

import copy

import pytest
import torch
from vlm_checks import (
    IMPLS,
    check_batch_equals_each_alone,
    check_cache_equals_no_cache,
    check_generation_equals_the_reference,
    check_unpatched_when_nothing_is_reduced,
    compute_counter,
    generate_no_early_stop,
    logits_and_language_model_width,
    make_llava,
    prompts,
    reference_inputs,
    uneven_prompts,
)

import tokenreduce
from tokenreduce.errors import ConfigError

transformers = pytest.importorskip("transformers")

PATCHES = 16  # the tiny tower's patches per image; one CLS before them; 2 layers, feature layer -2 (layer 0's output)
REDUCING = {"pitome": {"ratio": 0.7}, "tome": {"r": 3}, "tofu": {"r": 3}}
ZERO = {"pitome": {"ratio": 1.0}, "tome": {"r": 0}, "tofu": {"r": 0}}


def reduced_tower(model, name, params):
    """A copy of the model's tower, reduced on its own by the CLIP adapter."""
    return tokenreduce.apply(copy.deepcopy(model.model.vision_tower), name, **params)


# --- hf_clip: the hidden states LLaVA asks for ----------------------------------------------------------
@pytest.mark.parametrize("select", [1, 2, -1, -2, [-2, -1], [1]])
def test_the_clip_tower_returns_the_selected_hidden_states(select):
    """Unreduced (r=0): the entries transformers gives, exactly, None where it gives None; reduced: the
    selected entries hold the tokens that leave those layers."""
    tower = make_llava().model.vision_tower
    pixels = prompts()["pixel_values"]
    with torch.no_grad():
        expected = tower(pixels, output_hidden_states=select).hidden_states
        tokenreduce.apply(tower, "tome", r=0)
        got = tower(pixels, output_hidden_states=select).hidden_states
        assert len(got) == len(expected) == 3
        for g, e in zip(got, expected, strict=True):
            assert (g is None) == (e is None) and (g is None or torch.equal(g, e))
        tokenreduce.apply(tower, "tome", r=3)
        got = tower(pixels, output_hidden_states=select).hidden_states
    leaving = [1 + PATCHES, 1 + PATCHES - 3, 1 + PATCHES - 6]  # embeddings, layer 0's output, layer 1's output
    for j, g in enumerate(got):
        assert (g is None) == (expected[j] is None) and (g is None or g.shape == (2, leaving[j], 32))


@pytest.mark.parametrize("select, words", [(3, "indices \\[3\\] are out of range"), (-4, "indices \\[-4\\]"),
                                           ("all", "output_hidden_states='all' is not supported"),
                                           (True, "output_hidden_states=True is not supported")])
def test_the_clip_tower_refuses_other_selections(select, words):
    tower = tokenreduce.apply(make_llava().model.vision_tower, "tome", r=3)
    calls = []
    hook = tower.embeddings.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match=words):
        tower(prompts()["pixel_values"], output_hidden_states=select)
    hook.remove()
    assert not calls


# --- exactness, removal, counts ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZERO))
def test_zero_reduction_equals_the_unpatched_model(name):
    model = make_llava()
    check_unpatched_when_nothing_is_reduced(generate_no_early_stop, model, prompts(), name, ZERO[name])
    stats = tokenreduce.stats(model)
    assert stats["visual_per_image"] == [PATCHES, PATCHES] and stats["tower"]["feature_tokens"] == PATCHES + 1


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_remove_restores_the_model(name):
    model, inputs = make_llava(), prompts()
    cls, tower_cls = type(model), type(model.model.vision_tower)
    with torch.no_grad():
        expected = model(**inputs).logits
        tokenreduce.apply(model, name, **REDUCING[name])
        assert type(model.model.vision_tower) is not tower_cls
        assert model(**inputs).logits.shape[1] < expected.shape[1]
        tokenreduce.remove(model)
        tower = model.model.vision_tower
        assert type(model) is cls and not hasattr(model, "_tokenreduce")
        assert type(tower) is tower_cls and not hasattr(tower, "_tokenreduce") and not hasattr(tower, "token_reducer")
        assert "get_image_features" not in vars(model.model)
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_image_tokens_entering_the_language_model_are_what_the_tower_leaves(name):
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, name, **REDUCING[name])
    logits, entering = logits_and_language_model_width(model, inputs)
    with torch.no_grad():
        alone = reduced_tower(model, name, REDUCING[name])(inputs["pixel_values"], output_hidden_states=-2)
    stats = tokenreduce.stats(model)
    k = alone.hidden_states[-2].shape[1] - 1  # strategy "default": the CLS token is not a feature
    # the one layer before the feature layer merged 3 of the 16 patches (pitome: 30% of them, 4)
    assert k == {"pitome": PATCHES - 4, "tome": PATCHES - 3, "tofu": PATCHES - 3}[name]
    assert stats["tower"]["feature_tokens"] - 1 == k
    assert stats["visual_per_image"] == [k, k] and stats["visual_per_sample"] == [k, k]
    assert stats["image_tokens"] == PATCHES and stats["image_patches"] == PATCHES
    width = int(inputs["attention_mask"].sum(1).max()) - PATCHES + k
    assert entering == width and logits.shape[1] == width


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_the_reduced_model_equals_a_hand_built_reference(attn, name):
    """The reduced tower run alone (CLIP adapter), the feature layer selected by hand (CLS dropped),
    projected, the placeholder runs cut by hand, the unpatched model called with them."""
    reference, inputs = make_llava(attn), prompts()
    with torch.no_grad():
        states = reduced_tower(reference, name, REDUCING[name])(inputs["pixel_values"],
                                                               output_hidden_states=-2)
        projected = reference.model.multi_modal_projector(states.hidden_states[-2][:, 1:])
        hand = reference_inputs(inputs, list(projected))
        expected = reference(**hand).logits
        model = tokenreduce.apply(make_llava(attn), name, **REDUCING[name])
        got = model(**inputs).logits
    assert got.shape == expected.shape and hand["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


# --- generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", ["pitome", "tofu"])
def test_generation_with_the_cache_equals_generation_without(attn, name):
    check_cache_equals_no_cache(generate_no_early_stop, make_llava(attn), prompts(), name, REDUCING[name])


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("make_inputs", [prompts, uneven_prompts], ids=["even", "uneven"])
def test_a_padded_batch_gives_each_prompt_what_it_gets_alone(attn, make_inputs):
    model = tokenreduce.apply(make_llava(attn), "pitome", **REDUCING["pitome"])
    check_batch_equals_each_alone(generate_no_early_stop, model, make_inputs())


@pytest.mark.parametrize("attn", IMPLS)
def test_generation_equals_the_reference_generation(attn):
    """generate() on the reduced model gives the unpatched model's generation from the hand-shortened
    prompt and the reduced tower's projected features (the decode positions follow the shortened
    prompt, which the batch-versus-solo test cannot see: every image keeps the same count)."""
    reference, inputs = make_llava(attn), prompts()
    with torch.no_grad():
        states = reduced_tower(reference, "pitome", REDUCING["pitome"])(inputs["pixel_values"], output_hidden_states=-2)
        features = list(reference.model.multi_modal_projector(states.hidden_states[-2][:, 1:]))
    model = tokenreduce.apply(make_llava(attn), "pitome", **REDUCING["pitome"])
    check_generation_equals_the_reference(reference, features, model, inputs)


# --- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, words", [
    ("pitome", {"ratio": 1.5}, "ratio"),
    ("tome", {"r": -1}, "r=-1"),
    # diffrate's per-layer lists are checked against the tower's 2 layers, not the language model's 5
    ("diffrate", {"prune": [0, 0, 0]}, "prune has 3 entries but the model has 2 blocks"),
])
def test_bad_parameters_are_refused_at_apply(name, params, words):
    model = make_llava()
    with pytest.raises(ConfigError, match=words):
        tokenreduce.apply(model, name, **params)
    assert type(model) is transformers.LlavaForConditionalGeneration
    assert type(model.model.vision_tower) is transformers.CLIPVisionModel


def test_a_tower_reduced_on_its_own_or_a_list_of_feature_layers_is_refused():
    model = make_llava()
    tokenreduce.apply(model.model.vision_tower, "tome", r=2)
    with pytest.raises(ConfigError, match="already carries a reducer of its own"):
        tokenreduce.apply(model, "pitome", ratio=0.7)
    tokenreduce.remove(model.model.vision_tower)
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ConfigError, match=r"vision_feature_layer=\[-2, -1\].*allowed: one int feature layer"):
        tokenreduce.apply(model, "pitome", ratio=0.7)
    assert type(model) is transformers.LlavaForConditionalGeneration


def test_forward_and_generate_refusals_come_before_any_compute():
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, "pitome", ratio=0.7)
    counter = compute_counter(model)
    with pytest.raises(ConfigError, match="output_hidden_states=True"):
        model(**inputs, output_hidden_states=True)
    with pytest.raises(ConfigError, match="output_attentions=True"):
        model(**inputs, output_attentions=True)
    with pytest.raises(ConfigError, match="vision_feature_layer=-1"):
        model(**inputs, vision_feature_layer=-1)
    with pytest.raises(ConfigError, match="num_beams=2"):
        model.generate(**inputs, max_new_tokens=2, num_beams=2)
    assert counter.calls == 0


def test_reapplying_replaces_the_towers_reducer():
    model, inputs = make_llava(), prompts()
    tokenreduce.apply(model, "pitome", ratio=0.7)
    tokenreduce.apply(model, "tome", r=1)
    with torch.no_grad():
        model(**inputs)
    assert model.model.vision_tower.token_reducer is model.token_reducer
    assert tokenreduce.stats(model)["visual_per_image"] == [PATCHES - 1, PATCHES - 1]
    tokenreduce.apply(model, "visionzip", dominant=4, contextual=2)  # to placement (b): the tower is unpatched
    assert type(model.model.vision_tower) is transformers.CLIPVisionModel
    with torch.no_grad():
        model(**inputs)
    assert tokenreduce.stats(model)["visual_per_image"] == [6, 6] and "tower" not in tokenreduce.stats(model)
