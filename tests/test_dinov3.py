"""DINOv3 ViTs (timm's Eva with RotaryEmbeddingDinoV3, a class token and four register tokens):
exact when nothing is removed, RoPE positions that follow the kept and merged tokens, every
reducer, and refusals."""

import math

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
from test_eva_adapter import SETTINGS
from test_invariants import NEEDS_CLASS_TOKEN
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from timm.models.eva import Eva

import tokenreduce
from tokenreduce.adapters.timm_eva import describe, grid_coords, rope_embed
from tokenreduce.core.merge import source_matrix
from tokenreduce.core.state import ReductionState

DINOV3 = tuple(timm.list_models("*dinov3*"))
SMALL = "vit_small_patch16_dinov3"
PREFIX = 5  # class token + 4 registers


def make_dinov3(name: str = SMALL, **kwargs) -> torch.nn.Module:
    """timm's configuration of `name`, shrunk: 4 blocks, 64 channels, 8 x 8 patches, random weights,
    and LayerScale at 1 (not 1e-5), so that the blocks and their RoPE, not the residual, set the output."""
    torch.manual_seed(0)
    shrink = {"depth": 4, "embed_dim": 64, "num_heads": 2, "img_size": 128, "num_classes": 10, "init_values": 1.0,
              **kwargs}
    return timm.create_model(name, pretrained=False, **shrink).eval()


def sharp_dinov3(**kwargs) -> torch.nn.Module:
    """`make_dinov3` returning its pooled features, with q and k 8 times larger: attention far from
    uniform, so that a token's RoPE changes the output (at timm's initialisation it barely does)."""
    model = make_dinov3(num_classes=0, **kwargs)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * model.embed_dim].mul_(8)
    return model


def images(batch=2, size=(128, 128), seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_every_dinov3_model_is_claimed_at_its_full_size():
    assert len(DINOV3) >= 12 and SMALL in DINOV3
    for name in DINOV3:
        model = timm.create_model(name, pretrained=False, device="meta")  # timm's own sizes, no memory
        assert type(model.rope) is RotaryEmbeddingDinoV3, name
        info = describe(model)
        assert (info.num_prefix, info.has_class_token, info.depth) == (PREFIX, True, len(model.blocks)), name


@pytest.mark.parametrize("name", DINOV3)
def test_zero_reduction_remove_and_a_reduced_pass_for_every_variant(name):
    model = make_dinov3(name)
    x = images()
    check_zero_reduction_and_remove(model, x, "tome", {"r": 0})
    with torch.no_grad():
        want = model(x)
        out = tokenreduce.apply(model, "tome", r=8)(x)
        assert torch.isfinite(out).all() and tokenreduce.stats(model)["tokens"] == [69, 61, 53, 45, 37]
        tokenreduce.remove(model)
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("kwargs", [
    {"global_pool": "token"},  # upstream DINOv3 reads the class token
    {"dynamic_img_size": False},  # timm's cached embedding of a fixed grid
    {"num_reg_tokens": 0},  # a class token only
    {"rope_grid_indexing": "xy", "rope_grid_offset": 0.25},
])
def test_zero_reduction_of_other_settings(kwargs):
    model = make_dinov3(**kwargs)
    check_zero_reduction_and_remove(model, images(), "tome", {"r": 0})
    check_zero_reduction_and_remove(model, images(), "topk", {"ratio": 1.0, "layers": [1, 2]})


@pytest.mark.parametrize("grid", [(8, 8), (7, 5), (1, 3)])
@pytest.mark.parametrize("options", [
    {}, {"normalize_coords": "min"}, {"normalize_coords": "max", "grid_offset": 0.5}, {"grid_indexing": "xy"},
    {"temperature": None, "min_period": 0.5, "max_period": 40.0},
])
def test_rope_at_grid_coordinates_is_timms_embedding(grid, options):
    rope = RotaryEmbeddingDinoV3(dim=32, **options)
    embed = rope.get_embed(shape=list(grid))
    coords = grid_coords(rope, grid)
    assert coords.shape == (grid[0] * grid[1], 2)
    assert torch.equal(rope_embed(rope, coords, embed.dtype), embed)
    assert torch.equal(rope_embed(rope, coords.expand(3, -1, -1), embed.dtype)[2], embed)  # batched


def dinov3_rope(rope: RotaryEmbeddingDinoV3, coords):
    """DINOv3's RoPE written out: angle 2 pi c / period per axis and frequency, sin then cos, each
    frequency twice in half-rotation order (the layout of `rotate_half=True`)."""
    angles = (2 * math.pi * coords[:, :, None] / rope.periods).flatten(1)
    return torch.cat([angles.sin(), angles.sin(), angles.cos(), angles.cos()], -1)


def record_sources(monkeypatch) -> list[tuple[torch.Tensor, int]]:
    """The source map after each merge or pruning step of a pass (trace_source=True), and the number
    of tokens the step left (a dropped token's slot)."""
    sources, original = [], ReductionState.merge

    def merge(self, x, assignment, mode="wavg", **kwargs):
        out = original(self, x, assignment, mode, **kwargs)
        if assignment is not None:
            sources.append((self.source.clone(), out.shape[1]))
        return out

    monkeypatch.setattr(ReductionState, "merge", merge)
    return sources


def reference(model, x, sources, layers):
    """timm's blocks, one image at a time, on the tokens the recorded source maps leave after each
    acting layer's attention: a token's features are the size-weighted mean of the tokens going into
    it, its size counts its patches, its attention logits get log(size), and its RoPE is timm's own
    grid entry of its patch while it holds one patch (gathered from `rope.get_embed`), else DINOv3's
    RoPE at the mean of its patches' grid coordinates."""
    rope = model.rope
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x))[0])
    grid = (x.shape[-2] // 16, x.shape[-1] // 16)
    grid_embed, coords = rope.get_embed(shape=list(grid)), grid_coords(rope, grid)
    outputs = []
    for b in range(x.shape[0]):
        t = tokens[b : b + 1]
        members = [[i] for i in range(t.shape[1])]  # the input tokens each token holds, prefix first
        steps = iter(sources)
        for layer, blk in enumerate(model.blocks):
            sizes = torch.tensor([float(len(m)) for m in members])
            patches = members[PREFIX:]
            embed = torch.stack([grid_embed[m[0] - PREFIX] if len(m) == 1 else
                                 dinov3_rope(rope, coords[[i - PREFIX for i in m]].mean(0, keepdim=True))[0]
                                 for m in patches])
            t = t + blk.gamma_1 * blk.attn(blk.norm1(t), rope=embed, attn_mask=sizes.log()[None, None, None])
            if layer in layers:
                source, n_out = next(steps)
                slot = source[b]
                new_t, new_members = [], []
                for k in range(n_out):
                    into = [j for j, m in enumerate(members) if int(slot[m[0]]) == k]
                    w = sizes[into]
                    new_t.append((t[0, into] * w[:, None]).sum(0) / w.sum())
                    new_members.append(sorted(i for j in into for i in members[j]))
                t, members = torch.stack(new_t)[None], new_members
            t = t + blk.gamma_2 * blk.mlp(blk.norm2(t))
        t = model.norm(t)
        sizes = torch.tensor([float(len(m)) for m in members[PREFIX:]])
        pooled = (t[0, PREFIX:] * sizes[:, None]).sum(0) / sizes.sum()
        outputs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outputs)


@pytest.mark.parametrize("reducer, params, layers", [
    ("topk", {"ratio": 0.6, "layers": [1, 2]}, [1, 2]),  # pruning: kept patches keep timm's RoPE entries
    ("random", {"ratio": 0.5, "layers": [0, 2]}, [0, 2]),
    ("tome", {"r": 8}, [0, 1, 2, 3]),  # merging, at the mean of the merged patches' coordinates
])
def test_reduced_model_equals_timms_blocks_on_the_tokens_it_keeps(reducer, params, layers, monkeypatch):
    model = sharp_dinov3()
    x = images(size=(128, 112))  # 8 x 7 patches: the RoPE of a non-square grid
    sources = record_sources(monkeypatch)
    with torch.no_grad():
        got = tokenreduce.apply(model, reducer, **params, trace_source=True,
                                adapter_options={"merged_position": "mean"})(x)
        want = reference(model, x, sources, layers)
    assert len(sources) == len(layers)
    for source, _ in sources:  # the class token and the registers are never dropped, merged or moved
        assert torch.equal(source[:, :PREFIX], torch.arange(PREFIX).expand(2, -1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", ["destination", "mean"])
@pytest.mark.parametrize("reducer", ["tome", "pitome", "mctf", "topk", "evit"])
def test_positions_follow_the_tokens(reducer, rule):
    """Registers and the class token keep position 0 and no RoPE; every other token sits at one of
    its patches' DINOv3 coordinates, or at their size-weighted mean (EViT's fused token and 'mean')."""
    model = make_dinov3()
    tokenreduce.apply(model, reducer, **SETTINGS[reducer], trace_source=True, adapter_options={"merged_position": rule})
    with torch.no_grad():
        model(images(batch=3, size=(160, 144)))  # 10 x 9 patches
    state = model._tokenreduce.last_state
    coords = torch.cat([torch.zeros(PREFIX, 2), grid_coords(model.rope, (10, 9))])
    members = source_matrix(state.source, state.final_tokens)
    positions = state.positions
    assert state.final_tokens < 95 and torch.equal(positions[:, :PREFIX], torch.zeros(3, PREFIX, 2))
    assert torch.equal(members[:, :PREFIX, :PREFIX], torch.eye(PREFIX).expand(3, -1, -1))
    mean = members @ coords / members.sum(-1, keepdim=True)
    if rule == "mean":
        torch.testing.assert_close(positions, mean, rtol=0, atol=1e-6)
    else:
        hits = ((positions.unsqueeze(2) == coords).all(-1) & (members > 0)).any(-1)
        if reducer == "evit":
            hits |= ((positions - mean).abs() < 1e-6).all(-1)
        assert hits.all()


@pytest.mark.parametrize("reducer", sorted(SETTINGS))
def test_every_reducer_runs(reducer):
    model = tokenreduce.apply(make_dinov3(), reducer, **SETTINGS[reducer])
    with torch.no_grad():
        out = model(images())
    assert torch.isfinite(out).all()
    assert reducer == "none" or sum(tokenreduce.stats(model)["removed"]) > 0


@pytest.mark.parametrize("reducer", [n for n in SETTINGS if n not in NEEDS_CLASS_TOKEN | {"none"}])
def test_every_reducer_runs_with_registers_and_no_class_token(reducer):
    model = tokenreduce.apply(make_dinov3(class_token=False, global_pool="avg"), reducer, **SETTINGS[reducer])
    with torch.no_grad():
        assert torch.isfinite(model(images())).all()
    assert model._tokenreduce.last_state.num_prefix == 4


def test_token_counts_follow_the_schedule():
    model = tokenreduce.apply(make_dinov3(), "tome", r=20)  # capped at half the patches
    with torch.no_grad():
        model(images())
    expected = model.token_reducer.removal_counts(4, 64)
    assert expected == [20, 20, 12, 6]
    assert tokenreduce.stats(model)["removed"] == expected
    assert tokenreduce.stats(model)["tokens"] == [69, 49, 29, 17, 11]


def test_gradients_and_bfloat16():
    model = tokenreduce.apply(make_dinov3(drop_path_rate=0.1), "tome", r=8).train()
    assert not parameters_without_gradient(model, images())
    state = check_bfloat16(model.eval(), images())
    assert state.positions.dtype == torch.float32 and model.rope.periods.dtype == torch.float32


def test_analytic_macs_equal_flop_counter():
    model = tokenreduce.apply(make_dinov3(), "tome", r=8)
    flops = counted_flops(model, images())
    assert tokenreduce.stats(model)["macs"] * 2 * 2 == flops


@pytest.mark.parametrize("build, words", [
    # learned per-layer frequencies: no angle at a new position without the layer's own table
    (lambda: Eva(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, use_rot_pos_emb=True,
                 rope_type="mixed"), ["(Eva)", "RotaryEmbeddingMixed", "RotaryEmbeddingDinoV3"]),
    (lambda: make_dinov3(rope_rescale_coords=2.0), ["augments its RoPE"]),
])
def test_unsupported_ropes_are_named(build, words):
    check_refused(build(), words, r=2)
