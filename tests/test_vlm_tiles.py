"""Image features shrunk between the vision tower and the language model of a transformers
LlavaNextForConditionalGeneration (VisionZip, PruMerge, PruMerge+; docs/vlm.md, placement (b)), on
the tiny random LLaVA-NeXT of tests/test_vlm_families.py (CLIP 16x16 views in 4x4 patches; a 16x32
image is a base view and a 1x2 grid of tiles, a 32x32 image a base view and a 2x2 grid): every view
is reduced on its own and each image's tokens are laid out as the base view's, then the tiles' kept
patches in raster order of the image's whole grid, then the tiles' CLS and merged tokens. Checked:
keeping every patch gives the unpatched features without their newline tokens; the layout equals
a plain-loop reference built from the unpatched tower's views; `remove` restores the model; the
tokens entering the language model are the counts; greedy generation with the KV cache equals
generation without it; a left-padded batch of images of two sizes gives each prompt what it gets
alone; the refusals come before any compute; the MACs equal a hand count; match_visual_tokens
reaches its count."""

from __future__ import annotations

import re

import pytest
import torch
from test_vlm_families import make, solo
from vlm_checks import (
    IMAGE,
    IMPLS,
    PAD,
    check_cache_equals_no_cache,
    compute_counter,
    generate_no_early_stop,
    logits_and_language_model_width,
)

import tokenreduce
from tokenreduce.adapters import adapter_for, hf_vlm
from tokenreduce.core.visual_tokens import prumerge
from tokenreduce.core.vlm import BoundaryView
from tokenreduce.cost import probe_pass
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import reducer_class

transformers = pytest.importorskip("transformers")

SIDE = 4  # patches a side of one view (16 pixels in patches of 4)
PATCHES = SIDE * SIDE
# an image's size -> its views (the base view and its tiles), its grid of tiles (rows, columns), and
# the unreduced model's run of placeholders (base view, grid, one newline token per grid row)
TILES = {(16, 32): (3, (1, 2), 16 + 4 * 8 + 4), (32, 32): (5, (2, 2), 16 + 8 * 8 + 8)}
REDUCING = {
    "visionzip": {"dominant": 4, "contextual": 2},  # per view: CLS + 3 dominant patches + 2 contextual = 6
    "prumerge": {"neighbours": 4},
    "prumerge+": {"neighbours": 4},
}
KEEP_ALL = {"dominant": PATCHES, "contextual": 0, "keep_cls": False}  # visionzip keeping every patch, no CLS


def batch(sizes, rows=None, seed: int = 1) -> dict:
    """Left-padded prompts, by default one image a prompt (`rows`: each prompt's images), of the
    given (height, width) sizes, each image's placeholder run as long as the unreduced model's."""
    rows = rows or [[i] for i in range(len(sizes))]
    texts = [[1, 5, 6], [4, 5]]
    ids = []
    for r, images in enumerate(rows):
        row = list(texts[r % 2])
        for i in images:
            row += [IMAGE] * TILES[tuple(sizes[i])][2] + [7, 8]
        ids.append(row)
    width = max(map(len, ids))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in ids])
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "image_sizes": torch.tensor(sizes),
            "pixel_values": torch.randn(len(sizes), 5, 3, 16, 16, generator=generator)}  # room for 5 views


def two_sizes() -> dict:
    """A 16x32 image (3 views, a run of 52) and a 32x32 one (5 views, a run of 88), one per prompt."""
    return batch([[16, 32], [32, 32]])


# --- the reference, by hand ---------------------------------------------------------------------------
def reduced_views(model, inputs: dict, name: str, params: dict) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per image, per view: its reduced tokens after the projector and the tower token each stands
    at, by hand: the unpatched tower's hidden states, the signals from the layers' own projections,
    the reducer's own rule (reduce_features)."""
    views = [TILES[tuple(s)][0] for s in inputs["image_sizes"].tolist()]
    pixels = torch.cat([p[:v] for p, v in zip(inputs["pixel_values"], views, strict=True)])
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    with torch.no_grad():
        states = tower(pixels, output_hidden_states=True).hidden_states
        y = states[-2]  # vision_feature_layer -2: the output of layers[-2]
        if name == "visionzip":
            h = layers[-2].layer_norm1(states[-3])
            attn = layers[-2].self_attn
            t, n, _ = h.shape
            q = attn.q_proj(h).view(t, n, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(h).view(t, n, attn.num_heads, -1).transpose(1, 2)
            cls = (q @ k.transpose(2, 3) * attn.scale).softmax(-1)[:, :, 0]
            view = BoundaryView(hidden=y, prefix=1, keeps_prefix=False, cls_attention=cls, feature_keys=k)
        else:  # the layer after the feature layer, its q/k projections taken whole
            h = layers[-1].layer_norm1(y)
            q, k = layers[-1].self_attn.q_proj(h), layers[-1].self_attn.k_proj(h)
            cls = (q @ k.transpose(1, 2) * k.shape[-1] ** -0.5).softmax(-1)[:, 0]
            view = BoundaryView(hidden=y, prefix=1, keeps_prefix=False, next_cls_attention=cls, next_keys=k)
        out = reducer_class(name)(**params).reduce_features(view)
        projected = model.model.multi_modal_projector(out.tokens)
    per_view = [(projected[t, :c], out.positions[t, :c]) for t, c in enumerate(out.counts.tolist())]
    starts = [sum(views[:i]) for i in range(len(views))]
    return [per_view[s:s + v] for s, v in zip(starts, views, strict=True)]


def laid_out_by_hand(views: list[tuple[torch.Tensor, torch.Tensor]], rows: int, cols: int) -> torch.Tensor:
    """One image's tokens by plain loops: the base view's as given; each place of the image's grid of
    patches in raster order, the token of its tile that stands at that patch (if kept); each tile's
    CLS token (position 0); each tile's merged tokens (position -1)."""
    (base, _), tiles = views[0], views[1:]
    out = [base]
    for r in range(rows * SIDE):
        for c in range(cols * SIDE):
            tokens, positions = tiles[(r // SIDE) * cols + c // SIDE]
            patch = (r % SIDE) * SIDE + c % SIDE
            out += [tokens[j:j + 1] for j in range(len(positions)) if positions[j] == 1 + patch]
    for wanted in (0, -1):
        out += [tokens[j:j + 1] for tokens, positions in tiles for j in range(len(positions)) if positions[j] == wanted]
    return torch.cat(out)


def expected_features(model, inputs: dict, name: str, params: dict) -> list[torch.Tensor]:
    per_image = reduced_views(model, inputs, name, params)
    grids = [TILES[tuple(s)][1] for s in inputs["image_sizes"].tolist()]
    return [laid_out_by_hand(views, *grid) for views, grid in zip(per_image, grids, strict=True)]


def cut_by_hand(inputs: dict, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's real tokens with image i's placeholder run cut to its first counts[i] (the runs
    in order, prompt by prompt), left-padded to the longest."""
    rows, image, seen, previous = [], -1, 0, None
    for b in range(inputs["input_ids"].shape[0]):
        row = []
        for token in inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist():
            if token == IMAGE:
                image, seen = (image + 1, 0) if previous != IMAGE else (image, seen)
                seen += 1
                if seen > counts[image]:
                    previous = token
                    continue
            row.append(token)
            previous = token
        rows.append(row)
        previous = None
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    return ids, (ids != PAD).long()


def reference_logits(reference, inputs: dict, features: list[torch.Tensor]) -> torch.Tensor:
    """The unpatched model given the hand-cut prompts and the laid-out features as the encoder's output."""
    ids, mask = cut_by_hand(inputs, [f.shape[0] for f in features])
    image = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=features)
    with torch.no_grad():
        return reference(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": image}).logits


# --- the boundary facts and the positions -----------------------------------------------------------------
def test_llava_next_has_the_facts_of_its_clip_tower():
    model = make("llava_next")
    info = adapter_for(model).describe(model)
    assert (info.vision_tokens, info.vision_prefix, info.feature_layer, info.image_patches) == (PATCHES + 1, 1, 0,
                                                                                                 PATCHES)


def test_the_reducers_say_which_tower_token_each_token_stands_at():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, PATCHES + 1, 8, generator=generator)
    cls = torch.randn(2, 4, PATCHES + 1, generator=generator).softmax(-1)
    keys = torch.randn(2, 4, PATCHES + 1, 2, generator=generator)
    view = BoundaryView(hidden=hidden, prefix=1, keeps_prefix=False, cls_attention=cls, feature_keys=keys,
                        next_cls_attention=cls[:, 0], next_keys=keys)
    out = reducer_class("visionzip")(dominant=4, contextual=2).reduce_features(view)
    positions = out.positions
    assert (positions[:, 0] == 0).all() and (positions[:, 4:] == -1).all()  # the CLS first, the contextual last
    assert ((positions[:, 1:4] >= 1) & (positions[:, 1:4] <= PATCHES)).all()
    stood = hidden.gather(1, positions[:, :4].unsqueeze(-1).expand(-1, -1, 8))
    assert torch.equal(out.tokens[:, :4], stood)  # a kept token is the tower token it stands at
    out = reducer_class("prumerge+")(neighbours=4).reduce_features(view)
    assert torch.equal(out.positions, prumerge(cls[:, 0], keys, hidden, plus=True, neighbours=4).index)


# --- exactness, removal, counts ----------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
def test_keeping_every_patch_gives_the_unpatched_features_without_newline_tokens(attn):
    """VisionZip keeping every patch of every view: the base view's features, then the tiles' in the
    grid's raster order, which the unpatched model gives too, with a newline token after each row
    (these images need no unpadding)."""
    model, inputs = make("llava_next", attn), two_sizes()
    with torch.no_grad():
        unpatched = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    expected = []
    for features, size in zip(unpatched, inputs["image_sizes"].tolist(), strict=True):
        (rows, cols), grid = TILES[tuple(size)][1], features[PATCHES:]
        expected.append(torch.cat([features[:PATCHES], grid.view(rows * SIDE, cols * SIDE + 1, -1)[:, :-1].flatten(0, 1)]))
    reference_out = reference_logits(model, inputs, expected)
    tokenreduce.apply(model, "visionzip", **KEEP_ALL)
    check_features_and_logits(model, inputs, expected, reference_out)
    stats = tokenreduce.stats(model)
    assert stats["visual_per_image"] == [3 * PATCHES, 5 * PATCHES] and stats["image_tokens"] == 88


@pytest.mark.parametrize("name", sorted(REDUCING))
@pytest.mark.parametrize("layout", ["one_image_a_prompt", "two_images_in_one_prompt"])
def test_the_layout_equals_a_plain_loop_reference(name, layout):
    """Features reduced view by view by hand, laid out by plain loops, placeholder runs cut by hand,
    the unpatched model called with them: the same features and logits."""
    inputs = two_sizes() if layout == "one_image_a_prompt" else batch([[32, 32], [16, 32]], rows=[[0, 1]])
    reference = make("llava_next")
    expected = expected_features(reference, inputs, name, REDUCING[name])
    expected_logits = reference_logits(reference, inputs, expected)
    model = tokenreduce.apply(make("llava_next"), name, **REDUCING[name])
    check_features_and_logits(model, inputs, expected, expected_logits)
    assert tokenreduce.stats(model)["visual_per_image"] == [e.shape[0] for e in expected]


def check_features_and_logits(model, inputs, expected, expected_logits):
    """The reduced model's image features are `expected` (one tensor per image) and its logits
    `expected_logits`."""
    with torch.no_grad():
        got = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        logits = model(**inputs).logits
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_remove_restores_the_model(name):
    model, inputs = make("llava_next"), two_sizes()
    cls = type(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        tokenreduce.apply(model, name, **REDUCING[name])
        assert model(**inputs).logits.shape[1] < expected.shape[1]
        tokenreduce.remove(model)
        assert type(model) is cls and not hasattr(model, "_tokenreduce")
        assert "get_image_features" not in vars(model.model)
        modules = [*model.model.vision_tower.encoder.layers, model.model.multi_modal_projector]
        hooks = [h for m in modules for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
        assert not any(isinstance(h, hf_vlm.ProjectorHook) or isinstance(getattr(h, "__self__", None),
                                                                         hf_vlm.FeatureHook) for h in hooks)
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_the_tokens_entering_the_language_model_are_the_counts(name):
    inputs = two_sizes()
    counts = [e.shape[0] for e in expected_features(make("llava_next"), inputs, name, REDUCING[name])]
    if name == "visionzip":
        assert counts == [3 * 6, 5 * 6]
    model = tokenreduce.apply(make("llava_next"), name, **REDUCING[name])
    logits, entering = logits_and_language_model_width(model, inputs)
    stats = tokenreduce.stats(model)
    assert stats["visual_per_image"] == counts and stats["visual_per_sample"] == counts
    runs = torch.tensor([TILES[tuple(s)][2] for s in inputs["image_sizes"].tolist()])
    real = inputs["attention_mask"].sum(1) - runs + torch.tensor(counts)  # each prompt's tokens after the cut
    width = int(real.max())
    assert entering == width and logits.shape[1] == width and stats["tokens"] == [width] * 6
    assert stats["visual_tokens"] == [max(counts)] * 5 and stats["image_tokens"] == int(runs.max())
    assert stats["kept"].shape == (2, width) and ((stats["kept"] < 0).sum(1) == width - real).all()


# --- generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_generation_with_the_cache_equals_generation_without(attn, name):
    check_cache_equals_no_cache(generate_no_early_stop, make("llava_next", attn), two_sizes(), name, REDUCING[name])


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_a_padded_batch_of_two_image_sizes_gives_each_prompt_what_it_gets_alone(attn, name):
    model, inputs = tokenreduce.apply(make("llava_next", attn), name, **REDUCING[name]), two_sizes()
    tokens, logits = generate_no_early_stop(model, inputs)
    for i in range(2):
        alone_tokens, alone_logits = generate_no_early_stop(model, solo("llava_next", inputs, i))
        assert torch.equal(tokens[i:i + 1], alone_tokens)
        torch.testing.assert_close(logits[i:i + 1], alone_logits, atol=1e-5, rtol=1e-5)


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "cls"), [("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
                                             ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
                                             ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")])
def test_the_classes_without_a_cls_token_refuse_the_boundary_reducers(family, cls):
    model = make(family)
    for name, params in REDUCING.items():
        with pytest.raises(ConfigError, match=f"{re.escape(name)}: model {cls} cannot take a reducer at the boundary "
                                              ".*has no CLS token.*allowed: the language-model reducers 'fastv', "
                                              "'pyramiddrop', 'dart', 'sparsevlm' on this model"):
            tokenreduce.apply(model, name, **params)
        assert not hasattr(model, "_tokenreduce")


REFUSED = {  # what is changed in the inputs -> the words of the refusal
    "no image_sizes": (lambda i: i.pop("image_sizes"), "image_sizes=None is not supported .*tiles and their grid"),
    "too few sizes": (lambda i: i.update(image_sizes=i["image_sizes"][:1]),
                      r"image_sizes=\[\[16, 32\]\] .*pixel_values hold 2 images"),
    "float sizes": (lambda i: i.update(image_sizes=i["image_sizes"].float()), r"image_sizes=\[\[16.0, 32.0\]"),
    "too few views": (lambda i: i.update(pixel_values=i["pixel_values"][:, :3]),
                      r"images of those sizes have \[3, 5\] views .*pixel_values hold at most 3 per image"),
    "views in all": (lambda i: i.update(pixel_values=i["pixel_values"].flatten(0, 1)), "pixel_values hold 10 in all"),
    "feature layer": (lambda i: i.update(vision_feature_layer=-1), "vision_feature_layer=-1"),
    "strategy": (lambda i: i.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy='full'"),
    "hidden states": (lambda i: i.update(output_hidden_states=True), "output_hidden_states=True"),
    "labels": (lambda i: i.update(labels=i["input_ids"]), "labels"),
}


@pytest.mark.parametrize(("change", "words"), REFUSED.values(), ids=REFUSED.keys())
def test_bad_inputs_are_refused_before_any_compute(change, words):
    model, inputs = tokenreduce.apply(make("llava_next"), "visionzip", **REDUCING["visionzip"]), two_sizes()
    change(inputs)
    counter = compute_counter(model)
    with pytest.raises(ConfigError, match=f"{words}.*allowed: "), torch.no_grad():
        model(**inputs)
    assert counter.calls == 0


def test_generate_without_image_sizes_is_refused_before_any_compute():
    model, inputs = tokenreduce.apply(make("llava_next"), "prumerge", **REDUCING["prumerge"]), two_sizes()
    inputs.pop("image_sizes")
    counter = compute_counter(model)
    with pytest.raises(ConfigError, match="image_sizes=None is not supported .*allowed: one .height, width."):
        model.generate(**inputs, max_new_tokens=2)
    assert counter.calls == 0


def test_placeholder_runs_that_are_not_one_per_image_are_refused():
    model, inputs = tokenreduce.apply(make("llava_next"), "visionzip", **REDUCING["visionzip"]), two_sizes()
    split = inputs["input_ids"].clone()
    split[0, split.shape[1] - 30] = 7  # the first prompt's run cut in two
    with pytest.raises(ConfigError, match=r"placeholder tokens in runs of \[\d+, \d+, 88\] for 2 images of \[18, 30\] "
                                          r"tokens .*allowed: the processor's placeholder runs, one per image"):
        with torch.no_grad():
            model(**{**inputs, "input_ids": split})


# --- cost ------------------------------------------------------------------------------------------------
def test_the_macs_parts_equal_a_hand_count():
    """Per prompt (the 16x32 image's 3 views and the 32x32 image's 5, 4 a prompt): every view through
    the whole CLIP tower (the patch embedding, per layer q/k/v/out and the MLP per token and the
    attention's two products), the projector on the kept tokens only, VisionZip's CLS attention per
    view, the decoder layers on the shortened sequence; the first decode step over it."""
    model, inputs = tokenreduce.apply(make("llava_next"), "visionzip", **REDUCING["visionzip"]), two_sizes()
    logits, width = logits_and_language_model_width(model, inputs)
    stats = tokenreduce.stats(model)
    parts = stats["macs_parts"]
    d, tokens, mlp = 32, PATCHES + 1, 64
    view = PATCHES * 3 * 4 * 4 * d + 2 * (tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d)
    views = (3 + 5) / 2
    assert parts["vision_tower"] == round(views * view)
    assert parts["projector"] == (18 + 30) / 2 * (d * d + d * d)
    assert parts["reducer"] == views * (tokens * d * d + d * d + tokens * d)  # keys, the CLS query, q.k
    kv = 2 * 8  # 2 key-value heads of width 8
    layer = d * d + 2 * d * kv + d * d + 3 * d * mlp
    assert parts["blocks"] == 5 * (width * layer + 2 * width * width * d)
    assert stats["macs"] == parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert stats["decode_macs"] == d * 64 + 5 * (layer + 2 * (width + 1) * d)


def test_match_visual_tokens_sets_visionzip_on_the_probe_image():
    """The probe is a 32x32 image: 5 views of dominant + contextual tokens each."""
    model = make("llava_next")
    bound = adapter_for(model).token_bound(model)
    assert bound == TILES[(32, 32)][2]  # the probe's run, as the unreduced model fills it
    params, reached = tokenreduce.match_visual_tokens(model, "visionzip", 40, contextual=2)
    assert params == {"contextual": 2, "dominant": 6} and reached == 40 and not hasattr(model, "_tokenreduce")
    tokenreduce.apply(model, "visionzip", **params)
    probed = probe_pass(model)
    assert probed["visual_per_image"] == [40] and probed["image_tokens"] == bound
