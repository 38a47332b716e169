"""Visual tokens dropped inside the language model (placement (c): FastV, PyramidDrop, DART,
SparseVLM) of the other vision-language classes: LLaVA-NeXT and LLaVA-OneVision (tiled images,
unpadded, image_newline tokens; Llama and Qwen2 language models) and Qwen2-VL and Qwen2.5-VL (3-D
rotary positions), on tiny random configs: zero reduction is the unpatched model, `remove` restores
it, the visual tokens per layer follow each schedule, greedy generation with the KV cache equals
generation without, a left-padded batch gives each prompt what it gets alone, the vision tower's
MACs equal a hand count, the matched settings reach their counts, and the placements these classes
do not take are refused before any compute (docs/vlm.md)."""

from __future__ import annotations

import pytest
import torch
from vlm_checks import (
    IMAGE,
    IMPLS,
    PAD,
    check_cache_equals_no_cache,
    check_unpatched_when_nothing_is_reduced,
    generate,
    generate_no_early_stop,
    make_llava,
)
from vlm_checks import prompts as llava_prompts

import tokenreduce
from tokenreduce.adapters import adapter_for, hf_clip
from tokenreduce.adapters.hf_vlm_families import PROBE_GRID
from tokenreduce.core.visual_tokens import (
    dart_keep_count,
    fastv_keep_count,
    pyramid_schedule,
    sparsevlm_recycle_counts,
)
from tokenreduce.cost import probe_pass
from tokenreduce.errors import ConfigError, UnsupportedModelError

transformers = pytest.importorskip("transformers")

VIDEO, START, END = 60, 61, 62  # Qwen's video placeholder and the image run's opening and closing tokens
FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
QWEN_GRID = 8  # patches a side of a Qwen test image: 16 visual tokens after the 2x2 merge
TILED_TOKENS = 52  # a 16x32 image on the tiled models: 16 (base) + 32 (2 tiles) + 4 newline tokens


def text_config(cls, **kwargs):
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=64, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kwargs)


def make(family: str, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    if family in ("llava_next", "llava_onevision"):
        tiles = {"image_grid_pinpoints": [[16, 32], [32, 16], [32, 32]], "image_token_index": IMAGE,
                 "attn_implementation": attn}
        if family == "llava_next":
            vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=16, patch_size=4)
            config = transformers.LlavaNextConfig(vision_config=vision, vision_feature_layer=-2,
                                                  text_config=text_config(transformers.LlamaConfig), **tiles)
            return transformers.LlavaNextForConditionalGeneration(config).eval()
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=16, patch_size=4)
        config = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text_config(transformers.Qwen2Config),
                                                   video_token_index=VIDEO, **tiles)
        return transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
    ids = {"image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": START, "vision_end_token_id": END,
           "attn_implementation": attn}
    if family == "qwen2_vl":
        vision = transformers.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4)
        text = text_config(transformers.Qwen2VLTextConfig, rope_parameters=rope)
        config = transformers.Qwen2VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **ids)
        return transformers.Qwen2VLForConditionalGeneration(config).eval()
    vision = transformers.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                                 out_hidden_size=32, patch_size=4, window_size=16, fullatt_block_indexes=[1])
    text = text_config(transformers.Qwen2_5_VLTextConfig, rope_parameters=rope)
    config = transformers.Qwen2_5_VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **ids)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def is_qwen(family: str) -> bool:
    return family.startswith("qwen")


def visual_count(family: str) -> int:
    return QWEN_GRID ** 2 // 4 if is_qwen(family) else TILED_TOKENS


def padded_prompts(family: str, placeholder: int, counts: list[int]) -> dict:
    """Two prompts of different lengths, each with one run of `counts[i]` placeholders (Qwen's between
    its start and end tokens), left-padded into one batch: input_ids and attention_mask."""
    runs = [[START] + [placeholder] * c + [END] if is_qwen(family) else [placeholder] * c for c in counts]
    rows = [[1, 5, 6] + runs[0] + [7, 8, 9], [4, 5] + runs[1] + [7, 8]]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def prompts(family: str, model) -> dict:
    """Two prompts of different lengths with one image each (of the same size, so the same number of
    visual tokens), left-padded into one batch."""
    generator = torch.Generator().manual_seed(1)
    inputs = padded_prompts(family, IMAGE, [visual_count(family)] * 2)
    ids = inputs["input_ids"]
    if is_qwen(family):
        patch = model.config.vision_config.patch_size
        inputs["pixel_values"] = torch.randn(2 * QWEN_GRID ** 2, 3 * 2 * patch * patch, generator=generator)
        inputs["image_grid_thw"] = torch.tensor([[1, QWEN_GRID, QWEN_GRID]] * 2)
        inputs["mm_token_type_ids"] = (ids == IMAGE).int()
    else:
        inputs["pixel_values"] = torch.randn(2, 5, 3, 16, 16, generator=generator)  # room for 5 tiles, 3 used
        inputs["image_sizes"] = torch.tensor([[16, 32], [16, 32]])
    return inputs


def solo(family: str, inputs: dict, i: int) -> dict:
    """Sample i of the batch alone, without its padding."""
    keep = inputs["attention_mask"][i].bool()
    alone = {"input_ids": inputs["input_ids"][i:i + 1, keep]}
    if is_qwen(family):
        per_image = QWEN_GRID ** 2
        alone["pixel_values"] = inputs["pixel_values"][i * per_image:(i + 1) * per_image]
        alone["image_grid_thw"] = inputs["image_grid_thw"][i:i + 1]
        alone["mm_token_type_ids"] = inputs["mm_token_type_ids"][i:i + 1, keep]
    else:
        alone["pixel_values"] = inputs["pixel_values"][i:i + 1]
        alone["image_sizes"] = inputs["image_sizes"][i:i + 1]
    return alone


def built(family: str, attn: str = "sdpa"):
    model = make(family, attn)
    return model, prompts(family, model)


# each reducer at a setting that drops tokens on the 5-layer language model, and its counts of visual
# tokens through layers 0..4 for V visual tokens per prompt
REDUCING = {
    "fastv": ({"layer": 2, "keep": 0.25}, lambda v: [v, v] + [fastv_keep_count(v, 0.75)] * 3),
    "pyramiddrop": ({"layers": [1, 3], "ratio": 0.5},
                    lambda v: [v] + [pyramid_schedule(v, [1, 3], 0.5)[0]] * 2 + [pyramid_schedule(v, [1, 3], 0.5)[1]] * 2),
    "dart": ({"layer": 2, "budget": 8, "image_pivots": 1, "text_pivots": 1},
             lambda v: [v, v] + [dart_keep_count(8, 1, 1)] * 3),
    "sparsevlm": ({"layers": [1, 3], "scale": 0.0, "bias": [8, 4]}, lambda v: [v, v] + [sparse_kept(v, 8)] * 2
                  + [sparse_kept(sparse_kept(v, 8), 4)]),
}


def sparse_kept(v: int, k: int) -> int:
    """SparseVLM's image tokens after a layer keeping k of v rated ones: k and one token per cluster of
    the recycled pruned ones (its default shares)."""
    return k + sparsevlm_recycle_counts(v - k)[1]
ZERO = {"fastv": {"layer": 2, "keep": 1.0}, "pyramiddrop": {"layers": [1, 3], "ratio": 1.0}, "none": {}}


# --- the classes are claimed, and what they do not take is refused ------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_each_class_is_claimed_by_the_vision_language_adapter(family):
    model = make(family)
    assert adapter_for(model).name == "hf_vlm"
    info = adapter_for(model).describe(model)
    # boundary facts for LLaVA-NeXT's CLIP tower only (16 patches and the CLS; test_vlm_tiles)
    assert (info.depth, info.image_token_id, info.vision_tokens) == (5, IMAGE, 17 if family == "llava_next" else 0)


BOUNDARY_REFUSED = [family for family in FAMILIES if family != "llava_next"]  # LLaVA-NeXT's: test_vlm_tiles
TOWER = ("pitome", {"ratio": 0.9}, "merges in a vision tower.*LLaVA-1.5")


@pytest.mark.parametrize(("family", "name", "params", "words"), [
    *[(family, "visionzip", {"dominant": 4, "contextual": 2}, "cannot take a reducer at the boundary .*no CLS token")
      for family in BOUNDARY_REFUSED],
    *[(family, "prumerge", {}, "cannot take a reducer at the boundary .*no CLS token") for family in BOUNDARY_REFUSED],
    *[(family, *TOWER) for family in FAMILIES],
])
def test_the_tower_and_boundary_placements_are_refused(family, name, params, words):
    model = make(family)
    with pytest.raises(ConfigError, match=f"{words}.*allowed: "):
        tokenreduce.apply(model, name, **params)
    assert not hasattr(model, "_tokenreduce")


FRAMES = 4  # a test video: OneVision pools each 16x16 frame to 2x2 (16 tokens and a newline); Qwen merges
VIDEO_TOKENS = {"llava_onevision": FRAMES * 4 + 1, "qwen2_vl": FRAMES // 2 * QWEN_GRID ** 2 // 4,
                "qwen2_5_vl": FRAMES // 2 * QWEN_GRID ** 2 // 4}  # Qwen: 2 frames a temporal patch


def video_prompts(family: str, model) -> dict:
    """prompts() with a video in place of each image (of the same length, so the same tokens)."""
    generator = torch.Generator().manual_seed(6)
    inputs = padded_prompts(family, VIDEO, [VIDEO_TOKENS[family]] * 2)
    ids = inputs["input_ids"]
    if is_qwen(family):
        patch = model.config.vision_config.patch_size
        inputs["pixel_values_videos"] = torch.randn(2 * FRAMES * QWEN_GRID ** 2 // 2, 3 * 2 * patch * patch,
                                                    generator=generator)
        inputs["video_grid_thw"] = torch.tensor([[FRAMES // 2, QWEN_GRID, QWEN_GRID]] * 2)
        inputs["mm_token_type_ids"] = (ids == VIDEO).int() * 2
    else:
        inputs["pixel_values_videos"] = torch.randn(2, FRAMES, 3, 16, 16, generator=generator)
    return inputs


@pytest.mark.parametrize("family", sorted(VIDEO_TOKENS))
@pytest.mark.parametrize("name", ["fastv", "pyramiddrop"])
def test_a_video_is_cut_as_an_image_is(family, name):
    """A video's placeholders are visual tokens: the counts follow the schedule, generation with the
    cache equals generation without, and the vision tower's MACs are counted on the video."""
    model = make(family)
    inputs = video_prompts(family, model)
    check_cache_equals_no_cache(generate, model, inputs, name, REDUCING[name][0])
    v = VIDEO_TOKENS[family]
    stats = tokenreduce.stats(model)
    assert stats["visual_by_sample"] == [REDUCING[name][1](v)] * 2 and stats["image_tokens"] == v
    assert stats["macs_parts"]["vision_tower"] > 0 and stats["macs_parts"]["projector"] > 0


def test_a_language_model_with_sliding_window_layers_is_refused():
    model = make("qwen2_vl")
    model.model.language_model.config.layer_types = ["full_attention"] * 3 + ["sliding_attention"] * 2
    with pytest.raises(UnsupportedModelError, match=r"sliding-window attention .* at layers \[3, 4\]"):
        tokenreduce.apply(model, "fastv", layer=2, keep=0.5)
    with pytest.raises(UnsupportedModelError, match=r"sliding_window=4096\) at layers \[0, 1, 2, 3, 4\]"):
        tokenreduce.apply(llava_with_mistral(sliding_window=4096), "fastv", layer=2, keep=0.5)


def llava_with_mistral(**kwargs):
    """The tiny LLaVA of vlm_checks with a Mistral language model."""
    torch.manual_seed(0)
    llava = make_llava()
    text = text_config(transformers.MistralConfig, **kwargs)
    config = transformers.LlavaConfig(vision_config=llava.config.vision_config, text_config=text, image_token_index=IMAGE,
                                      vision_feature_layer=-2)
    return transformers.LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_a_mistral_language_model_takes_every_reducer(name):
    model = llava_with_mistral(sliding_window=None)
    assert type(model.model.language_model).__name__ == "MistralModel"
    check_cache_equals_no_cache(generate, model, llava_prompts(), name, REDUCING[name][0])


# --- exactness, removal, counts ----------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(ZERO))
def test_zero_reduction_equals_the_unpatched_model(attn, family, name):
    model, inputs = built(family, attn)
    check_unpatched_when_nothing_is_reduced(generate, model, inputs, name, ZERO[name])
    assert tokenreduce.stats(model)["visual_tokens"] == [visual_count(family)] * 5


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_model(family):
    model, inputs = built(family)
    cls = type(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        tokenreduce.apply(model, "fastv", **REDUCING["fastv"][0])
        assert "get_image_features" in vars(model.model)  # records the images each pass encodes
        assert model(**inputs).logits.shape[1] < expected.shape[1]
        tokenreduce.remove(model)
        assert type(model) is cls and "get_image_features" not in vars(model.model)
        assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_visual_tokens_per_layer_follow_the_schedule(family, name):
    params, counts = REDUCING[name]
    model, inputs = built(family)
    v = visual_count(family)
    expected = counts(v)
    tokenreduce.apply(model, name, **params)
    with torch.no_grad():
        logits = model(**inputs).logits
    stats = tokenreduce.stats(model)
    assert stats["visual_tokens"] == expected and stats["image_tokens"] == v
    text = inputs["input_ids"].shape[1] - v
    assert stats["tokens"] == [text + c for c in expected] + [text + expected[-1]]
    assert logits.shape[1] == text + expected[-1]
    unreduced = tokenreduce.apply(make(family), "none")
    with torch.no_grad():
        unreduced(**inputs)
    full = tokenreduce.stats(unreduced)["macs_parts"]
    parts = stats["macs_parts"]
    assert parts["vision_tower"] == full["vision_tower"] > 0 and parts["projector"] == full["projector"] > 0
    assert parts["blocks"] < full["blocks"] and stats["macs"] == sum(v for k, v in parts.items() if k != "total")


# --- generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_generation_with_the_cache_equals_generation_without(attn, family, name):
    model, inputs = built(family, attn)
    check_cache_equals_no_cache(generate, model, inputs, name, REDUCING[name][0])


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["fastv", "sparsevlm"])
def test_a_padded_batch_gives_each_prompt_what_it_gets_alone(attn, family, name):
    model, inputs = built(family, attn)
    tokenreduce.apply(model, name, **REDUCING[name][0])
    tokens, logits = generate_no_early_stop(model, inputs)
    for i in range(2):
        alone_tokens, alone_logits = generate_no_early_stop(model, solo(family, inputs, i))
        assert torch.equal(tokens[i:i + 1], alone_tokens)
        torch.testing.assert_close(logits[i:i + 1], alone_logits, atol=1e-5, rtol=1e-5)


def uneven_prompts(family: str, model) -> dict:
    """prompts() with images of two sizes, so the samples hold different numbers of visual tokens
    (Qwen: 8x8 and 8x12 patches, 16 and 24 tokens; tiled: 16x32 and 32x32 images, 52 and 84)."""
    inputs = prompts(family, model)
    if is_qwen(family):
        grids = [[1, QWEN_GRID, QWEN_GRID], [1, QWEN_GRID, QWEN_GRID + 4]]
        counts = [16, 24]
        patch = model.config.vision_config.patch_size
        generator = torch.Generator().manual_seed(4)
        inputs["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * patch * patch,
                                             generator=generator)
        inputs["image_grid_thw"] = torch.tensor(grids)
    else:
        inputs["image_sizes"] = torch.tensor([[16, 32], [32, 32]])
        counts = [int(f.shape[0]) for f in model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True).pooler_output]
    inputs.update(padded_prompts(family, IMAGE, counts))
    if is_qwen(family):
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).int()
    return inputs, counts


def uneven_solo(family: str, inputs: dict, i: int) -> dict:
    alone = solo(family, inputs, i)
    if is_qwen(family):  # the rows of image i's patches
        sizes = inputs["image_grid_thw"].prod(dim=1).tolist()
        start = sum(sizes[:i])
        alone["pixel_values"] = inputs["pixel_values"][start:start + sizes[i]]
    return alone


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_samples_with_different_numbers_of_visual_tokens_each_get_what_they_get_alone(family, name):
    """Each sample keeps its own counts (the schedule of its own image tokens); the batch is the
    samples alone, with the cache and without."""
    model = make(family)
    inputs, counts = uneven_prompts(family, model)
    assert counts[0] != counts[1]
    tokenreduce.apply(model, name, **REDUCING[name][0])
    tokens, logits = generate_no_early_stop(model, inputs)
    by_sample = tokenreduce.stats(model)["visual_by_sample"]
    assert by_sample == [REDUCING[name][1](c) for c in counts] or name == "sparsevlm"
    assert [row[0] for row in by_sample] == counts
    no_cache_tokens, no_cache_logits = generate_no_early_stop(model, inputs, use_cache=False)
    assert torch.equal(tokens, no_cache_tokens)
    torch.testing.assert_close(logits, no_cache_logits, atol=1e-5, rtol=1e-5)
    for i in range(2):
        alone_tokens, alone_logits = generate_no_early_stop(model, uneven_solo(family, inputs, i))
        assert torch.equal(tokens[i:i + 1], alone_tokens)
        torch.testing.assert_close(logits[i:i + 1], alone_logits, atol=1e-5, rtol=1e-5)
        assert tokenreduce.stats(model)["visual_by_sample"] == [by_sample[i]]


def test_a_sample_without_an_image_keeps_every_token():
    """A text-only prompt beside one with an image (LLaVA-1.5): it runs as it runs alone, unreduced."""
    model, inputs = make_llava(), llava_prompts()
    ids = inputs["input_ids"].clone()
    ids[1] = torch.where(ids[1] == IMAGE, 9, ids[1])  # sample 1: text only
    inputs = {**inputs, "input_ids": ids, "pixel_values": inputs["pixel_values"][:1]}
    tokenreduce.apply(model, "fastv", **REDUCING["fastv"][0])
    tokens, logits = generate_no_early_stop(model, inputs)
    assert tokenreduce.stats(model)["visual_by_sample"] == [REDUCING["fastv"][1](16), [0] * 5]
    alone = {"input_ids": ids[1:2, inputs["attention_mask"][1].bool()]}
    alone_tokens, alone_logits = generate_no_early_stop(model, alone)
    assert torch.equal(tokens[1:], alone_tokens)
    torch.testing.assert_close(logits[1:], alone_logits, atol=1e-5, rtol=1e-5)


# --- cost ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("media", ["image", "video"])
def test_the_qwen2_vl_tower_macs_equal_a_hand_count(media):
    """Qwen2-VL's tower on two 8x8-patch images (two videos of 2 temporal patches): the patch
    embedding, per block the qkv, proj and MLP per patch and full attention within each image (each
    temporal patch of a video: its cu_seqlens), the merger's MLP per merged token."""
    model = make("qwen2_vl")
    inputs = prompts("qwen2_vl", model) if media == "image" else video_prompts("qwen2_vl", model)
    tokenreduce.apply(model, "fastv", **REDUCING["fastv"][0])
    with torch.no_grad():
        model(**inputs)
    parts = tokenreduce.stats(model)["macs_parts"]
    vision = model.config.vision_config
    slices = 1 if media == "image" else FRAMES // 2  # the temporal patches, each attending within itself
    area = QWEN_GRID ** 2
    n = area * slices  # patches of one image (video)
    d, patch_in = vision.embed_dim, 3 * 2 * vision.patch_size ** 2
    hidden = d * vision.mlp_ratio
    per_image = n * patch_in * d + vision.depth * (n * (4 * d * d + 2 * d * hidden) + slices * 2 * area * area * d)
    merged, wide = n // 4, 4 * d
    assert parts["vision_tower"] == per_image  # per sample: one image each
    assert parts["projector"] == merged * (wide * wide + wide * vision.hidden_size)


def test_the_tiled_tower_macs_are_the_tiles_times_one_view():
    """LLaVA-NeXT's tower runs the base view and the 2 tiles of a 16x32 image through CLIP; the
    projector maps all their patch features."""
    model, inputs = built("llava_next")
    tokenreduce.apply(model, "fastv", **REDUCING["fastv"][0])
    with torch.no_grad():
        model(**inputs)
    parts = tokenreduce.stats(model)["macs_parts"]
    one_view = hf_clip.unreduced_tower_macs(model.model.vision_tower)["total"]
    patches = (16 // 4) ** 2
    assert parts["vision_tower"] == 3 * one_view
    assert parts["projector"] == 3 * patches * sum(m.in_features * m.out_features for m in
                                                   model.model.multi_modal_projector.modules()
                                                   if isinstance(m, torch.nn.Linear))


def test_a_pass_given_the_image_features_counts_no_tower():
    model, inputs = built("qwen2_vl")
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                              image_grid_thw=inputs["image_grid_thw"], return_dict=True)
    tokenreduce.apply(model, "fastv", **REDUCING["fastv"][0])
    with torch.no_grad():
        model(**inputs)  # encodes the images
        given = {k: v for k, v in inputs.items() if k != "pixel_values"}
        model(**given, mm_encoder_outputs={"image": features})
    parts = tokenreduce.stats(model)["macs_parts"]
    assert parts["vision_tower"] == parts["projector"] == 0 and parts["blocks"] > 0


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_match_visual_tokens_reaches_the_count_on_the_probe_prompt(family):
    model = make(family)
    bound = adapter_for(model).token_bound(model)
    assert bound == (PROBE_GRID ** 2 // 4 if is_qwen(family) else bound) and bound > 16
    params, reached = tokenreduce.match_visual_tokens(model, "fastv", 16, layer=2)
    assert reached == pytest.approx(16, rel=0.02) and not hasattr(model, "_tokenreduce")
    tokenreduce.apply(model, "fastv", **params)
    probed = probe_pass(model)
    assert probed["visual_tokens"][-1] == reached and probed["image_tokens"] == bound
    pivots = {"layer": 2, "image_pivots": 1, "text_pivots": 1}  # 2 pivots: odd counts
    params, reached = tokenreduce.match_visual_tokens(model, "dart", 15, **pivots)
    assert reached == 15 == dart_keep_count(params["budget"], 1, 1)


def test_the_layers_after_the_cut_get_the_kept_tokens_3d_rotary_embedding():
    """Qwen2-VL's rotary (cos, sin), computed by the model from the full prompt's 3-D positions, reach
    the layers after FastV's cut gathered at the kept tokens (and the decode steps keep the full
    numbering: the cached generation equals the no-cache one, test above)."""
    model, inputs = built("qwen2_vl")
    tokenreduce.apply(model, "fastv", **REDUCING["fastv"][0])
    seen = {0: [], 3: []}
    layers = model.model.language_model.layers
    hooks = [layers[i].register_forward_pre_hook(  # after the reducer's hooks: what the layer gets
        lambda m, args, kwargs, i=i: seen[i].append(kwargs["position_embeddings"]), with_kwargs=True) for i in seen]
    generate(model, inputs)
    for hook in hooks:
        hook.remove()
    kept = tokenreduce.stats(model)["kept"]
    (cos, sin), (kept_cos, kept_sin) = seen[0][0], seen[3][0]
    index = kept.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
    assert torch.equal(kept_cos, cos.gather(1, index)) and torch.equal(kept_sin, sin.gather(1, index))
    assert not torch.equal(cos[:, :, 1], cos[:, :, -1])  # the sections differ: the positions are 3-D


def test_renumbered_positions_are_refused_on_qwen_and_work_on_the_tiled_classes():
    with pytest.raises(ConfigError, match="renumber=True on Qwen2VLForConditionalGeneration, whose positions are 3-D"):
        tokenreduce.apply(make("qwen2_vl"), "pyramiddrop", layers=[1, 3], renumber=True)
    with pytest.raises(ConfigError, match="pyramiddrop: renumber='yes' is invalid; allowed: True or False"):
        tokenreduce.apply(make("llava_next"), "pyramiddrop", renumber="yes")
    model, inputs = built("llava_onevision")
    check_cache_equals_no_cache(generate, model, inputs, "pyramiddrop", {"layers": [1, 3], "ratio": 0.5, "renumber": True})


def test_an_image_and_a_video_in_one_prompt_are_both_visual_tokens():
    """Qwen2-VL: one prompt with an image (16 tokens) and a video (32): FastV ranks all 48 together, and
    the tower's MACs are the image's and the video's (each counted as in the prompts that hold one)."""
    model = make("qwen2_vl")
    image, video = prompts("qwen2_vl", model), video_prompts("qwen2_vl", model)
    v = VIDEO_TOKENS["qwen2_vl"]
    ids = torch.tensor([[1, 5, START] + [IMAGE] * 16 + [END, 6, START] + [VIDEO] * v + [END, 7, 8]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int(),
              "pixel_values": image["pixel_values"][QWEN_GRID ** 2:], "image_grid_thw": image["image_grid_thw"][1:],
              "pixel_values_videos": video["pixel_values_videos"][FRAMES * QWEN_GRID ** 2 // 2:],
              "video_grid_thw": video["video_grid_thw"][1:]}
    counts = [16 + v]
    parts = {}
    for media, given in (("image", image), ("video", video)):
        alone = tokenreduce.apply(make("qwen2_vl"), "fastv", **REDUCING["fastv"][0])
        with torch.no_grad():
            alone(**given)
        parts[media] = tokenreduce.stats(alone)["macs_parts"]
    check_cache_equals_no_cache(generate, model, inputs, "fastv", REDUCING["fastv"][0])
    stats = tokenreduce.stats(model)
    assert stats["visual_by_sample"] == [REDUCING["fastv"][1](c) for c in counts]
    for part in ("vision_tower", "projector"):
        assert stats["macs_parts"][part] == parts["image"][part] + parts["video"][part]
