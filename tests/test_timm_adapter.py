"""The timm ViT adapter keeps every model feature exact and refuses what it cannot handle."""

import pytest
import timm
import torch
from conftest import TINY_MODELS, images_for, make_model
from reduction_checks import check_refused, check_zero_reduction_and_remove
from timm.layers import Attention
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer

import tokenreduce
from tokenreduce.adapters.timm_vit import TimmBlockOps, attention_forward
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import ATTN, KEYS

IDENTITY_MODELS = [
    *TINY_MODELS,
    "deit_tiny_distilled_patch16_224",
    "qk_norm",
    "res_post",
    "vit_small_patch16_224",
]


def build(name):
    if name == "qk_norm":
        return make_model("test_vit", qk_norm=True)
    if name == "res_post":
        torch.manual_seed(0)
        return VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2,
                                 block_fn=ResPostBlock, init_values=0.1).eval()
    return make_model(name)


def native_images(model, batch=2):
    h, w = model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", IDENTITY_MODELS)
@pytest.mark.parametrize("reducer, params", [("tome", {"r": 0}), ("tome", {"ratio": 1.0}), ("none", {})])
def test_zero_reduction_and_remove_are_the_unpatched_model(name, reducer, params):
    model = build(name)
    check_zero_reduction_and_remove(model, native_images(model), reducer, params)
    assert type(model).__name__ in ("VisionTransformer", "VisionTransformerDistilled")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_forward_equals_timm_attention(fused, qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, scale_norm=qk_norm,
                     norm_layer=torch.nn.LayerNorm).eval()
    attn.fused_attn = fused
    x = torch.randn(2, 7, 32)
    bias = torch.randn(2, 1, 1, 7)
    for mask in (None, bias):
        want = attn(x, attn_mask=mask)
        for needs in (frozenset(), frozenset({KEYS}), frozenset({ATTN, KEYS})):
            got, signals = attention_forward(attn, x, mask, needs)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    _, signals = attention_forward(attn, x, None, frozenset({ATTN, KEYS}))
    assert signals.keys.shape == (2, 7, 8) and signals.attn.shape == (2, 4, 7, 7)
    torch.testing.assert_close(signals.attn.sum(-1), torch.ones(2, 4, 7))


def test_proportional_attention_equals_duplicated_keys():
    """A token of size s attends like s copies of it: merging exact duplicates changes nothing."""
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2).eval()
    base = torch.randn(1, 4, 16)
    duplicated = torch.cat([base, base[:, 2:3], base[:, 2:3]], dim=1)  # token 2 three times
    sizes = torch.tensor([1.0, 1.0, 3.0, 1.0]).view(1, 4, 1)
    bias = sizes.log().transpose(1, 2).unsqueeze(1)
    want = attn(duplicated)[:, :4]
    got, _ = attention_forward(attn, base, bias, frozenset())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_block_ops_recompose_the_block():
    model = make_model("test_vit2")  # LayerScale
    blk = model.blocks[0]
    x = torch.randn(2, 11, 64)
    ops = TimmBlockOps(blk)
    with torch.no_grad():
        y, _ = ops.attention(x, None, frozenset({KEYS}))
        torch.testing.assert_close(ops.mlp(y), blk(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(ops.plain(x, None), blk(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY_MODELS + ("deit_tiny_distilled_patch16_224",))
def test_features_and_head_called_on_their_own(name):
    model = tokenreduce.apply(build(name), "tome", r=6)
    x = native_images(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        separate = model.forward_head(feats)
        whole = model(x)
    assert feats.shape[1] == tokenreduce.stats(model)["tokens"][-1]
    torch.testing.assert_close(separate, whole, rtol=0, atol=0)


def test_avg_pool_is_weighted_by_size():
    model = tokenreduce.apply(make_model("test_vit2"), "tome", r=8)  # avg pool, one register token
    x = images_for(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        sizes = model._tokenreduce.last_state.sizes
        pooled = model.forward_head(feats, pre_logits=True)
    p = model.num_prefix_tokens
    want = (feats[:, p:] * sizes[:, p:]).sum(1) / sizes[:, p:].sum(1)
    torch.testing.assert_close(pooled, model.fc_norm(want))
    assert not torch.allclose(pooled, model.fc_norm(feats[:, p:].mean(1)))


def test_forward_intermediates_nlc_has_reduced_tokens():
    model = tokenreduce.apply(make_model("test_vit"), "tome", r=10)
    x = images_for(model)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, 3, 5], output_fmt="NLC", norm=True)
        logits = model.forward_head(final)
    assert [t.shape[1] for t in inter] == [90, 60, 40]  # patch tokens after blocks 0, 3, 5
    torch.testing.assert_close(logits, model(x))
    with pytest.raises(ConfigError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NCHW")


def test_forward_intermediates_nchw_unchanged_without_reduction():
    model = make_model("test_vit2")
    x = images_for(model)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=2, return_prefix_tokens=True)
        tokenreduce.apply(model, "tome", r=0)
        got = model.forward_intermediates(x, indices=2, return_prefix_tokens=True)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    for (g, gp), (w, wp) in zip(got[1], want[1], strict=True):
        assert g.shape == w.shape and g.dim() == 4
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        torch.testing.assert_close(gp, wp, rtol=0, atol=1e-6)


def test_masks_are_refused():
    model = tokenreduce.apply(make_model("test_vit"), "tome", r=2)
    with pytest.raises(ConfigError, match="attn_mask"):
        model.forward_features(images_for(model), attn_mask=torch.zeros(1))


@pytest.mark.parametrize("bad, words", [
    (lambda: torch.nn.Linear(3, 3), ["Linear", "not claimed by any adapter", "timm VisionTransformer"]),
    (lambda: timm.create_model("resnet18"), ["ResNet", "not claimed by any adapter", "timm VisionTransformer"]),
    (lambda: VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                               block_fn=ParallelScalingBlock), ["ParallelScalingBlock", "supported blocks"]),
    (lambda: VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                               class_token=False, global_pool="prr"), ["global_pool='prr'"]),
])
def test_unsupported_models_are_named(bad, words):
    check_refused(bad(), words, r=1)


def test_model_info_names_the_weights_family():
    from tokenreduce.adapters.timm_vit import describe

    assert describe(timm.create_model("vit_base_patch16_224.mae", depth=1)).name == "vit_base_patch16_224.mae"
    info = describe(make_model("deit_tiny_distilled_patch16_224"))
    assert info.name.startswith("deit_tiny_distilled_patch16_224") and info.num_prefix == 2 and info.depth == 12
    assert describe(VisionTransformer(img_size=32, depth=1, embed_dim=32, num_heads=2)).name == "VisionTransformer"
