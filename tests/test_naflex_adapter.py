"""The timm NaFlexViT adapter: images of different sizes in one padded batch give each the output it
gets alone; padding never merges, never counts in sizes or MACs; removal counts are per image."""

import pytest
import timm
import torch
from conftest import counted_flops
from reduction_checks import (
    check_bfloat16,
    check_refused,
    check_zero_reduction_and_remove,
    parameters_without_gradient,
)
from test_invariants import NEEDS_CLASS_TOKEN, PER_SAMPLE_DRAW
from test_invariants import SETTINGS as INVARIANT_SETTINGS
from timm.data.naflex_dataset import NaFlexCollator
from timm.models.naflexvit import batch_patchify

import tokenreduce
from tokenreduce.adapters import adapter_for
from tokenreduce.adapters.timm_naflex import describe, real_counts
from tokenreduce.errors import ConfigError, UnsupportedModelError

LAYERS = [1, 2]
SETTINGS = {name: {**params, "layers": LAYERS} if "layers" in params else params
            for name, params in INVARIANT_SETTINGS.items()}
SETTINGS["mstm"] = {**SETTINGS["mstm"], "fusion": False}  # its fusion needs square grids (tested below)
TINY = {"embed_dim": 64, "num_heads": 2, "depth": 4, "num_classes": 10}
SIZES = [(96, 128), (64, 80), (96, 128), (48, 48)]  # 48, 20, 48 and 9 patches of 16 x 16


def make(arch="naflexvit_base_patch16_gap", **kwargs) -> torch.nn.Module:
    """A tiny NaFlexViT from timm's configuration (4 register tokens, average pooling)."""
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **{**TINY, **kwargs}).eval()


def sample(height: int, width: int, seed: int) -> tuple[dict, int]:
    """One image as timm's NaFlex loader gives it: its patches, their (row, column), all valid."""
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    patches, (rows, cols) = batch_patchify(image, (16, 16))
    coord = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return {"patches": patches[0], "patch_coord": coord, "patch_valid": torch.ones(rows * cols, dtype=torch.bool)}, 0


def batch_of(sizes, seq_len=64):
    """A padded NaFlex batch of images of `sizes`, and each image as a batch of its own."""
    collate = NaFlexCollator(max_seq_len=seq_len)
    samples = [sample(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    return collate(samples)[0], [collate([s])[0] for s in samples]


def test_the_adapter_claims_naflexvit():
    model = make()
    assert adapter_for(model).name == "timm_naflex"
    info = describe(model)
    assert info.num_prefix == 4 and not info.has_class_token and info.depth == 4
    with pytest.raises(UnsupportedModelError, match="not a timm NaFlexVit"):
        describe(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("reducer, params", [("tome", {"r": 0}), ("pitome", {"ratio": 1.0}), ("none", {})])
def test_zero_reduction_and_remove_are_the_unpatched_model_on_images(reducer, params):
    model = make()
    check_zero_reduction_and_remove(model, torch.randn(2, 3, 96, 112), reducer, params)


@pytest.mark.parametrize("arch", ["naflexvit_base_patch16_gap", "naflexvit_base_patch16_map",
                                  "naflexvit_base_patch16_par_gap"])
def test_zero_reduction_on_a_padded_batch_is_the_unpatched_model(arch):
    model = make(arch)
    batch, _ = batch_of(SIZES)
    with torch.no_grad():
        want = model(batch)
        got = tokenreduce.apply(model, "tome", r=0)(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reducer", sorted(set(SETTINGS) - PER_SAMPLE_DRAW))
@pytest.mark.parametrize("arch", ["naflexvit_base_patch16_gap", "naflexvit_base_patch16_map"])
def test_each_image_of_a_padded_batch_gets_its_output_alone(reducer, arch):
    model = make(arch, class_token=True) if reducer in NEEDS_CLASS_TOKEN else make(arch)
    tokenreduce.apply(model, reducer, **SETTINGS[reducer])
    batch, alone = batch_of(SIZES)
    with torch.no_grad():
        each = torch.cat([model(x) for x in alone])
        together = model(batch)
    torch.testing.assert_close(together, each, rtol=1e-4, atol=1e-5)


def test_removal_counts_are_per_image_and_the_batch_keeps_the_widest():
    model = tokenreduce.apply(make(), "tome", r=6, trace_source=True)
    batch, _ = batch_of(SIZES)
    with torch.no_grad():
        features = model.forward_features(batch["patches"], batch["patch_coord"], batch["patch_valid"])
    stats = tokenreduce.stats(model)
    groups = {tuple(g["images"]): g for g in stats["groups"]}
    # 4 register tokens; ToMe removes 6 real tokens a layer, at most half of them
    assert groups[(0, 2)]["tokens"] == [52, 46, 40, 34, 28]
    assert groups[(1,)]["tokens"] == [24, 18, 12, 8, 6]
    assert groups[(3,)]["tokens"] == [13, 9, 7, 6, 5]
    assert stats["tokens"] == [52, 46, 40, 34, 28]  # the widest image sets the batch
    assert features["patches"].shape == (4, 28, 64)
    valid = features["patch_valid"]
    assert valid.shape == (4, 24) and valid.sum(1).tolist() == [24, 2, 24, 1]
    state = model._tokenreduce.last_state
    # padding has size 0; each image's sizes add up to its real patches
    assert state.sizes[..., 0][:, 4:].sum(1).tolist() == [48, 20, 48, 9]
    assert torch.equal(state.sizes[:, 4:, 0] > 0, valid)
    # the padded patches were never in a token; every real patch is in a real one
    source = stats["source"]
    for image, count in enumerate([48, 20, 48, 9]):
        assert (source[image, 4 + count :] == -1).all()
        assert valid[image][source[image, 4 : 4 + count] - 4].all()
    assert stats["macs"] == round(sum(g["macs"] * len(g["images"]) for g in stats["groups"]) / 4)


@pytest.mark.parametrize("reducer", ["tome", "pitome", "norm"])
def test_padded_macs_equal_flop_counter(reducer):
    """Padding costs nothing: the FLOPs of the batch are the sum of its images' MACs."""
    model = tokenreduce.apply(make(), reducer, **SETTINGS[reducer])
    batch, _ = batch_of(SIZES[:3])  # 48, 20, 48 patches: the mean MACs are whole
    flops = counted_flops(model, batch)
    stats = tokenreduce.stats(model)
    total = sum(g["macs"] * len(g["images"]) for g in stats["groups"])
    assert total * 2 == flops
    assert abs(stats["macs"] * 3 - total) <= 3


def test_analytic_macs_on_images_equal_flop_counter():
    model = tokenreduce.apply(make(), "tome", r=6)
    flops = counted_flops(model, torch.randn(2, 3, 96, 112))
    assert tokenreduce.stats(model)["macs"] * 2 * 2 == flops


def test_gradients_reach_every_parameter_on_a_padded_batch():
    model = tokenreduce.apply(make(drop_path_rate=0.1), "tome", r=6).train()
    batch, _ = batch_of(SIZES)
    assert not parameters_without_gradient(model, batch)


def test_bfloat16_runs_with_the_same_token_counts():
    check_bfloat16(tokenreduce.apply(make(), "tome", r=6), torch.randn(2, 3, 96, 112))


def test_a_reducer_with_pass_losses_is_refused_in_training_on_mixed_patch_counts():
    model = tokenreduce.apply(make(class_token=True), "dynamicvit", **SETTINGS["dynamicvit"]).train()
    batch, _ = batch_of(SIZES)
    with pytest.raises(ConfigError, match="dynamicvit trains with losses .* one number of patches, or eval mode"):
        model(batch)
    same, _ = batch_of([(96, 128), (128, 96)])  # 48 patches each: one group
    model(same)


def test_padding_before_real_patches_is_refused():
    with pytest.raises(ConfigError, match="patch_valid has padding before real patches"):
        real_counts(torch.tensor([[True, False, True]]))
    assert real_counts(torch.tensor([[True, True, False], [True, False, False]])).tolist() == [2, 1]


def test_masks_and_intermediates_are_refused_with_the_way_out():
    model = tokenreduce.apply(make(), "tome", r=2)
    batch, _ = batch_of(SIZES[:2])
    with pytest.raises(ConfigError, match="attn_mask .* tokenreduce.remove"):
        model({**batch, "attn_mask": torch.zeros(2, 1, 68, 68)})
    with pytest.raises(ConfigError, match="forward_intermediates .* tokenreduce.remove"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64))


def test_rope_naflexvit_is_refused_with_the_reason():
    check_refused(make(rope_type="axial"), ["rotary embeddings", "absolute positions"], r=2)


def test_mstm_fusion_refuses_a_grid_that_is_not_square():
    model = tokenreduce.apply(make(class_token=True), "mstm", ratio=0.7, layers=LAYERS)
    batch, _ = batch_of(SIZES[:2])
    with pytest.raises(ConfigError, match="mstm: fusion needs a square patch grid"):
        model(batch)


def test_merge_maps_refuse_naflexvit_with_the_reason():
    from tokenreduce import viz

    with pytest.raises(ConfigError, match="merge maps need a model that embeds a fixed patch grid"):
        viz.merge_maps(make(), torch.randn(1, 3, 64, 64), {"tome": ("tome", {"r": 2})})


@pytest.mark.parametrize("pool", ["avgmax", "max", "token"])
def test_every_pooling_gives_each_image_its_output_alone(pool):
    model = tokenreduce.apply(make(global_pool=pool, class_token=True), "tome", r=6)
    batch, alone = batch_of(SIZES)
    with torch.no_grad():
        each = torch.cat([model(x) for x in alone])
        together = model(batch)
    torch.testing.assert_close(together, each, rtol=1e-4, atol=1e-5)
