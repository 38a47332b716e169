"""The timm Eva adapter (EVA-02, RoPE ViTs, Perception Encoder): exact when nothing is removed,
RoPE positions that follow the tokens, the invariants of methods.md, every reducer, and refusals."""

import pytest
import timm
import torch
from conftest import counted_flops
from merge_checks import check_every_merge
from reduction_checks import (
    check_batch_independence,
    check_bfloat16,
    check_grad_checkpointing,
    check_refused,
    check_zero_reduction_and_remove,
    parameters_without_gradient,
    tome_groups,
)
from test_invariants import DROPS_TOKENS, NEEDS_CLASS_TOKEN, SEQUENCE_REDUCERS
from test_invariants import SETTINGS as INVARIANT_SETTINGS
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva

import tokenreduce
from tokenreduce.adapters.timm_eva import TimmEvaAdapter, describe, grid_coords, rope_embed
from tokenreduce.core.merge import carry_positions, keep_assignment, source_matrix
from tokenreduce.errors import ConfigError, UnsupportedModelError

# timm's own configurations, shrunk: 8x8 patches, 4 blocks, random weights
TINY_EVA = {
    # fused qkv with q/v biases, SwiGLU, average pooling, class token
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 112}),
    # separate q/k/v projections, sub-norms in the attention and the SwiGLU MLP, class token pooling
    "eva02_clip": ("eva02_base_patch16_clip_224", {"img_size": 128, "embed_dim": 64, "num_heads": 2}),
    # AttentionRope, LayerScale, xy-indexed RoPE without absolute positions (Naver RoPE-Axial)
    "rope_axial": ("vit_small_patch16_rope_224", {"img_size": 128, "embed_dim": 64, "num_heads": 2}),
    # Perception Encoder: pre-transformer norm, RoPE grid offset, attention pooling
    "pe": ("vit_pe_core_tiny_patch16_384", {"img_size": 128}),
    # a register token and no class token, average pooling
    "rope_reg": ("vit_medium_patch16_rope_reg1_gap_256", {"img_size": 128, "embed_dim": 64, "num_heads": 2}),
}
ROPE_MODELS = tuple(TINY_EVA)
LAYERS = [1, 2]  # the models have 4 blocks
# test_invariants' setting of every registered reducer, at layers these models have
SETTINGS = {name: {**params, "layers": LAYERS} if "layers" in params else params
            for name, params in INVARIANT_SETTINGS.items()}
POSITION_RULES = ("destination", "mean")


def make_eva(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "post_norm":  # EvaBlockPostNorm with RoPE
        return Eva(img_size=128, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=10,
                   use_post_norm=True, use_rot_pos_emb=True, **kwargs).eval()
    if name == "no_rope":  # EVA-1 style: absolute positions only
        return Eva(img_size=128, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=10, **kwargs).eval()
    arch, shrink = TINY_EVA[name]
    return timm.create_model(arch, pretrained=False, depth=4, num_classes=10, **shrink, **kwargs).eval()


def images(model, batch=2, seed=0):
    h, w = model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


ALL_MODELS = (*TINY_EVA, "post_norm", "no_rope")


def test_every_registered_reducer_has_a_setting():
    assert set(SETTINGS) == SEQUENCE_REDUCERS


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("reducer, params", [("tome", {"r": 0}), ("pitome", {"ratio": 1.0}), ("none", {})])
def test_zero_reduction_and_remove_are_the_unpatched_model(name, reducer, params):
    model = make_eva(name)
    check_zero_reduction_and_remove(model, images(model), reducer, params)


def test_dynamic_image_size_builds_the_grid_of_each_input():
    model = make_eva("eva02", dynamic_img_size=True)
    x = torch.randn(2, 3, 140, 126)  # 10 x 9 patches
    check_zero_reduction_and_remove(model, x, "tome", {"r": 0})
    tokenreduce.apply(model, "tome", r=8, trace_source=True, adapter_options={"merged_position": "mean"})
    with torch.no_grad():
        model(x)
    state = model._tokenreduce.last_state
    assert tokenreduce.stats(model)["tokens"] == [91, 83, 75, 67, 59]
    members = source_matrix(state.source, state.final_tokens)[:, 1:, 1:]
    coords = grid_coords(model.rope, (10, 9))
    torch.testing.assert_close(state.positions[:, 1:], members @ coords / members.sum(-1, keepdim=True))


@pytest.mark.parametrize("name", ["eva02", "rope_axial", "pe", "post_norm"])
def test_rope_at_grid_coordinates_is_timms_embedding(name):
    rope = make_eva(name).rope
    grid = rope.feat_shape
    embed = rope.get_embed()
    assert torch.equal(rope_embed(rope, grid_coords(rope, grid), embed.dtype), embed)


@pytest.mark.parametrize("name", ["eva02", "pe"])
def test_token_counts_follow_the_schedule(name):
    model = tokenreduce.apply(make_eva(name), "tome", r=20)  # capped at half the patches: 32, 22, ...
    with torch.no_grad():
        model(images(model))
    stats = tokenreduce.stats(model)
    expected = model.token_reducer.removal_counts(4, 64)
    assert expected == [20, 20, 12, 6]
    assert stats["removed"] == expected
    assert stats["tokens"] == [65, 45, 25, 13, 7]


@pytest.mark.parametrize("rule", POSITION_RULES)
@pytest.mark.parametrize("reducer", [n for n in SETTINGS if n != "none"])
def test_sizes_sources_and_positions_after_every_merge(reducer, rule, monkeypatch):
    """Sizes add up, each patch is in one token, prefix tokens stay first (merge_checks); and every
    token's RoPE position is its destination's (one of its patches' grid positions) or the
    size-weighted mean of its patches' grid positions."""
    counts = check_every_merge(monkeypatch) if reducer not in DROPS_TOKENS else [0]
    model = make_eva("eva02")
    tokenreduce.apply(model, reducer, adapter_options={"merged_position": rule}, **SETTINGS[reducer], trace_source=True)
    with torch.no_grad():
        model(images(model, batch=3))
    state = model._tokenreduce.last_state
    assert counts
    coords = torch.cat([torch.zeros(1, 2), grid_coords(model.rope, (8, 8))])  # class token, then patches
    members = source_matrix(state.source, state.final_tokens)  # [B, tokens, patches]
    positions = state.positions
    assert torch.equal(positions[:, 0], torch.zeros(3, 2))  # the class token has no position
    mean = members @ coords / members.sum(-1, keepdim=True)
    if rule == "mean" or reducer in DROPS_TOKENS:
        torch.testing.assert_close(positions, mean, rtol=0, atol=1e-5)
    else:
        # each position is the grid position of one of the token's own patches, but for EViT's fused
        # token (it has no destination), which is the mean of its patches
        hits = ((positions.unsqueeze(2) == coords).all(-1) & (members > 0)).any(-1)
        if reducer == "evit":
            hits |= ((positions - mean).abs() < 1e-5).all(-1)
        assert hits.all()


def _reference_tome(model, x, r, rule):
    """ToMe through a pre-norm Eva with RoPE, written as a plain loop from methods.md: attention
    with log-size bias and the RoPE of each token's carried position, bipartite matching on the
    keys before rotation, size-weighted merge, positions carried by `rule`."""
    rope, grid_embed = model.rope, model.rope.get_embed()
    num_prefix = model.num_prefix_tokens
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x))[0])
    batch = tokens.shape[0]
    coords = grid_coords(rope, rope.feat_shape)
    outputs = []
    for b in range(batch):
        t = tokens[b : b + 1]
        sizes = torch.ones(t.shape[1])
        pos = torch.cat([torch.zeros(num_prefix, 2), coords])
        embed = grid_embed
        for blk in model.blocks:
            attn = blk.attn
            h = blk.norm1(t)
            n = h.shape[1]
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            q, k, v = torch.nn.functional.linear(h, attn.qkv.weight, qkv_bias).reshape(1, n, 3, attn.num_heads, -1) \
                .permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            keys = k.mean(1)[0]
            q = torch.cat([q[:, :, :num_prefix], apply_rot_embed_cat(q[:, :, num_prefix:], embed)], 2)
            k = torch.cat([k[:, :, :num_prefix], apply_rot_embed_cat(k[:, :, num_prefix:], embed)], 2)
            logits = (q * attn.scale) @ k.transpose(-2, -1) + sizes.log()
            y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, n, -1)
            t = t + attn.proj(attn.norm(y))
            # ToMe: A = even positions, B = odd; the class token (position 0) is never a source
            groups = tome_groups(keys, r, num_prefix)
            new_t, new_sizes, new_pos = [], [], []
            for group in groups:
                w = sizes[group]
                new_t.append((t[0, group] * w[:, None]).sum(0) / w.sum())
                new_sizes.append(w.sum())
                dest = group[0]  # the kept A token or the B token the sources merged into
                new_pos.append((pos[group] * w[:, None]).sum(0) / w.sum() if rule == "mean" else pos[dest])
            t, sizes, pos = torch.stack(new_t)[None], torch.stack(new_sizes), torch.stack(new_pos)
            angles = pos[num_prefix:, :, None] * rope.bands
            embed = torch.cat([angles.sin().flatten(-2).repeat_interleave(2, -1),
                               angles.cos().flatten(-2).repeat_interleave(2, -1)], -1)
            t = t + blk.mlp(blk.norm2(t))
        t = model.norm(t)
        pooled = (t[0, num_prefix:] * sizes[num_prefix:, None]).sum(0) / sizes[num_prefix:].sum()
        outputs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outputs)


@pytest.mark.parametrize("rule", POSITION_RULES)
def test_tome_on_eva_equals_a_plain_loop(rule):
    model = make_eva("eva02")
    x = images(model)
    with torch.no_grad():
        want = _reference_tome(model, x, r=8, rule=rule)
        got = tokenreduce.apply(model, "tome", r=8, adapter_options={"merged_position": rule})(x)
    assert tokenreduce.stats(model)["tokens"] == [65, 57, 49, 41, 33]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_two_position_rules_differ_and_destination_is_the_default():
    model = make_eva("eva02")
    x = images(model)
    with torch.no_grad():
        default = tokenreduce.apply(model, "tome", r=8)(x)
        assert model._tokenreduce.options == {"merged_position": "destination"}
        dest = tokenreduce.apply(model, "tome", r=8, adapter_options={"merged_position": "destination"})(x)
        mean = tokenreduce.apply(model, "tome", r=8, adapter_options={"merged_position": "mean"})(x)
    assert torch.equal(default, dest) and not torch.allclose(dest, mean)


def test_reapplying_keeps_the_options_unless_new_ones_are_given():
    model = tokenreduce.apply(make_eva("eva02"), "tome", r=4, adapter_options={"merged_position": "mean"})
    tokenreduce.apply(model, "pitome", ratio=0.9)
    assert model._tokenreduce.options == {"merged_position": "mean"}
    tokenreduce.reducer_macs(model, "tome", r=8)  # swaps reducers and restores the model
    assert model._tokenreduce.options == {"merged_position": "mean"} and tokenreduce.reducer_of(model).name == "pitome"
    tokenreduce.apply(model, "tome", r=4, adapter_options={})
    assert model._tokenreduce.options == {"merged_position": "destination"}


def test_carry_positions_rules():
    positions = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]])
    sizes = torch.tensor([[[1.0], [3.0], [1.0], [1.0]]])
    from tokenreduce.core.merge import Assignment

    # token 1 (size 3) merges into token 2; token 3 is dropped
    merge = Assignment(dest=torch.tensor([[0, 1, 1, 2]]), n_out=2, merged=torch.tensor([[False, True, False, False]]))
    assert torch.equal(carry_positions(positions, sizes, merge, "destination"), torch.tensor([[[0.0, 0.0], [0.0, 3.0]]]))
    assert torch.equal(carry_positions(positions, sizes, merge, "mean"), torch.tensor([[[0.0, 0.0], [0.75, 0.75]]]))
    # pruning keeps the kept tokens' positions under both rules; EViT's fused token is the mean
    keep = torch.tensor([[True, False, True, False]])
    for rule in POSITION_RULES:
        assert torch.equal(carry_positions(positions, sizes, keep_assignment(keep), rule), positions[:, [0, 2]])
        fused = carry_positions(positions, sizes, keep_assignment(keep, fuse=True), rule)
        assert torch.equal(fused[:, 2], torch.tensor([[5.0 / 4, 2.0 / 4]]))
    with pytest.raises(ConfigError, match="'destination', 'mean'"):
        carry_positions(positions, sizes, merge, "median")


@pytest.mark.parametrize("reducer", sorted(SETTINGS))
@pytest.mark.parametrize("name", ["eva02", "rope_reg"])
def test_every_reducer_runs_or_is_refused_before_any_compute(reducer, name):
    model = make_eva(name)
    calls = []
    model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    if name == "rope_reg" and reducer in NEEDS_CLASS_TOKEN:  # a register token and no class token
        with pytest.raises(ConfigError, match="class token"):
            tokenreduce.apply(model, reducer, **SETTINGS[reducer])
        assert not calls and not hasattr(model, "_tokenreduce")
        return
    tokenreduce.apply(model, reducer, **SETTINGS[reducer])
    with torch.no_grad():
        out = model(images(model))
    stats = tokenreduce.stats(model)
    assert torch.isfinite(out).all()
    assert reducer == "none" or sum(stats["removed"]) > 0


@pytest.mark.parametrize("reducer", [n for n in SETTINGS if n not in NEEDS_CLASS_TOKEN | {"random"}])
def test_sample_output_does_not_depend_on_the_batch(reducer):
    model = tokenreduce.apply(make_eva("rope_reg"), reducer, **SETTINGS[reducer])
    check_batch_independence(model, images(model, batch=4))


@pytest.mark.parametrize("name", ["eva02", "eva02_clip", "pe"])
@pytest.mark.parametrize("reducer", ["tome", "mctf", "evit"])
def test_gradients_reach_every_parameter(name, reducer):
    model = tokenreduce.apply(make_eva(name, drop_path_rate=0.1), reducer, **SETTINGS[reducer]).train()
    assert not parameters_without_gradient(model, images(model))


@pytest.mark.parametrize("reducer", ["tome", "mctf"])
def test_grad_checkpointing_gives_the_same_gradients(reducer):
    model = tokenreduce.apply(make_eva("eva02"), reducer, **SETTINGS[reducer]).train()
    check_grad_checkpointing(model, images(model))


@pytest.mark.parametrize("name", ["eva02", "pe"])
@pytest.mark.parametrize("reducer", ["tome", "mctf", "evit"])
def test_bfloat16_runs_with_the_same_token_counts(name, reducer):
    model = tokenreduce.apply(make_eva(name), reducer, **SETTINGS[reducer])
    state = check_bfloat16(model, images(model))
    assert state.positions.dtype == torch.float32  # positions stay exact


@pytest.mark.parametrize("name", ["eva02", "eva02_clip", "pe", "rope_reg"])
@pytest.mark.parametrize("reducer", ["tome", "mctf", "dynamicvit"])
def test_analytic_macs_equal_flop_counter(name, reducer):
    model = tokenreduce.apply(make_eva(name), reducer, **SETTINGS[reducer])
    flops = counted_flops(model, images(model))
    assert tokenreduce.stats(model)["macs"] * 2 * 2 == flops


def test_intermediates_carry_the_reduced_tokens():
    model = tokenreduce.apply(make_eva("eva02"), "tome", r=8)
    with torch.no_grad():
        final, taken = model.forward_intermediates(images(model), indices=[0, 3], output_fmt="NLC")
    assert [t.shape[1] for t in taken] == [56, 32]  # patch tokens leaving blocks 0 and 3
    with pytest.raises(ConfigError, match="NCHW"):
        model.forward_intermediates(images(model), indices=[1])


@pytest.mark.parametrize("build, words", [
    (lambda: make_eva("rope_axial", rope_type="mixed"), ["RotaryEmbeddingMixed", "RotaryEmbeddingCat"]),
    (lambda: make_eva("eva02", patch_drop_rate=0.2), ["patch dropout"]),
    (lambda: make_eva("rope_axial", rope_shift_coords=1.0), ["augments its RoPE"]),
    (lambda: Eva(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, attn_type="rope", qkv_fused=False,
                 num_kv_heads=2, use_rot_pos_emb=True), ["grouped-query"]),
])
def test_unsupported_eva_variants_are_named(build, words):
    check_refused(build(), words, r=2)


def test_adapter_options_are_checked():
    model = make_eva("eva02")
    with pytest.raises(ConfigError, match="merged_position='centre' is invalid; allowed: 'destination', 'mean'"):
        tokenreduce.apply(model, "tome", r=2, adapter_options={"merged_position": "centre"})
    with pytest.raises(ConfigError, match="rope_offset not known to the timm Eva .* allowed: merged_position"):
        tokenreduce.apply(model, "tome", r=2, adapter_options={"rope_offset": 1})
    assert not hasattr(model, "_tokenreduce")


def test_describe_names_the_model():
    info = describe(make_eva("eva02"))
    assert info.name.startswith("eva02_tiny_patch14_224") and info.depth == 4 and info.num_prefix == 1
    assert TimmEvaAdapter().claims(make_eva("no_rope")) and not TimmEvaAdapter().claims(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="not a timm Eva"):
        describe(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_torch_compile_fullgraph_gives_the_same_output():
    model = tokenreduce.apply(make_eva("eva02"), "tome", r=8, adapter_options={"merged_position": "mean"})
    x = images(model)
    with torch.no_grad():
        want = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_merge_maps_draw_an_eva_model():
    from tokenreduce import viz

    model = make_eva("eva02")
    figure = viz.merge_maps(model, images(model), {"tome": ("tome", {"r": 8}), "evit": ("evit", SETTINGS["evit"])})
    assert len(figure.axes) == 6 and not hasattr(model, "_tokenreduce")
