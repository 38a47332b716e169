"""The timm relative-position adapter (BEiT, vit_relpos/vit_srelpos): exact when nothing is removed,
a bias that follows the tokens' positions (checked against a plain loop), the invariants of
methods.md, every reducer, MACs, and refusals."""

import math

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
from timm.layers import RelPosMlp
from timm.models.beit import Beit
from timm.models.vision_transformer_relpos import VisionTransformerRelPos

import tokenreduce
from tokenreduce.adapters import adapter_for
from tokenreduce.adapters.timm_relpos import Offsets, OffsetTable, describe, grid_positions
from tokenreduce.core.merge import source_matrix
from tokenreduce.errors import ConfigError, UnsupportedModelError

SHRINK = {"img_size": 96, "embed_dim": 64, "num_heads": 2}  # 6 x 6 patches
# timm's own configurations, shrunk to 4 blocks of 6 x 6 patches, random weights
TINY = {
    # a bias table per block with class-token entries, LayerScale gamma, average pooling with fc_norm
    "beit": ("beit_base_patch16_224", {}),
    # absolute positions and one bias table shared by all blocks
    "beit_shared": ("beit_base_patch16_224", {"use_abs_pos_emb": True, "use_rel_pos_bias": False,
                                               "use_shared_rel_pos_bias": True}),
    # an MLP of log-spaced offsets per block, no class token, LayerScale module
    "relpos": ("vit_relpos_small_patch16_224", {}),
    # the MLP bias with a class token (zero class entries) and class-token pooling
    "relpos_cls": ("vit_relpos_medium_patch16_cls_224", {}),
    # one MLP bias shared by all blocks
    "srelpos": ("vit_srelpos_small_patch16_224", {}),
    # residual post-norm blocks
    "rpn": ("vit_relpos_small_patch16_rpn_224", {}),
    # a bias table (RelPosBias) with class-token entries
    "relpos_table": ("vit_relpos_small_patch16_224", {"rel_pos_type": "bias", "class_token": True}),
}
LAYERS = [1, 2]
SETTINGS = {name: {**params, "layers": LAYERS} if "layers" in params else params
            for name, params in INVARIANT_SETTINGS.items()}
POSITION_RULES = ("destination", "mean")


def make(name: str, **kwargs) -> torch.nn.Module:
    """A tiny model whose position biases and layer scales are random (timm starts them at zero or
    near it, which would hide a bias read at the wrong place)."""
    arch, extra = TINY[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, depth=4, num_classes=10, **SHRINK, **extra, **kwargs).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "relative_position_bias_table" in pname or "rel_pos" in pname:
                p.normal_(std=0.5)
            elif pname.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                p.uniform_(0.5, 1.0)
    return model


def images(batch=2, seed=0):
    return torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(seed))


def test_every_registered_reducer_has_a_setting():
    assert set(SETTINGS) == SEQUENCE_REDUCERS


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("reducer, params", [("tome", {"r": 0}), ("pitome", {"ratio": 1.0}), ("none", {})])
def test_zero_reduction_and_remove_are_the_unpatched_model(name, reducer, params):
    check_zero_reduction_and_remove(make(name), images(), reducer, params)


@pytest.mark.parametrize("name", ["beit", "relpos", "srelpos", "relpos_table"])
def test_the_bias_at_grid_positions_is_timms(name):
    """The offset table read at every pair of grid positions is the bias timm's attention adds."""
    model = make(name)
    source = model.rel_pos_bias if name == "beit_shared" else model.shared_rel_pos if name == "srelpos" else (
        model.blocks[0].attn if name == "beit" else model.blocks[0].attn.rel_pos)
    want = source._get_rel_pos_bias() if name == "beit" else source.get_bias()
    positions = grid_positions((6, 6))[None]
    got = Offsets.of(positions, (6, 6)).read(OffsetTable.of(source), model.num_prefix_tokens)
    assert torch.equal(got, want)


def test_fractional_offsets_interpolate_between_the_four_entries_around_them():
    grid = torch.arange(5 * 5 * 2, dtype=torch.float32).reshape(5, 5, 2)  # a 3 x 3 grid of patches
    table = OffsetTable(grid=grid, prefix=None)
    positions = torch.tensor([[[0.0, 0.0], [0.5, 1.25], [2.0, 2.0]]])
    bias = Offsets.of(positions, (3, 3)).read(table, 0)  # [1, 2, 3, 3]
    # query 1 minus key 0 is (0.5, 1.25): rows 2 and 3, columns 3 and 4 of the table, around the centre (2, 2)
    want = (0.5 * 0.75 * grid[2, 3] + 0.5 * 0.25 * grid[2, 4] + 0.5 * 0.75 * grid[3, 3] + 0.5 * 0.25 * grid[3, 4])
    torch.testing.assert_close(bias[0, :, 1, 0], want)
    assert torch.equal(bias[0, :, 2, 0], grid[4, 4]) and torch.equal(bias[0, :, 0, 2], grid[0, 0])
    # the table is linear along each axis here, so interpolation is exact
    torch.testing.assert_close(bias[0, :, 1, 0], grid[2, 2] + 0.5 * (grid[3, 2] - grid[2, 2]) + 1.25 * (grid[2, 3] - grid[2, 2]))


@pytest.mark.parametrize("name", ["beit", "relpos"])
def test_token_counts_follow_the_schedule(name):
    model = tokenreduce.apply(make(name), "tome", r=20)  # capped at half the patches: 18, 9, 4, 2
    with torch.no_grad():
        model(images())
    stats = tokenreduce.stats(model)
    prefix = model.num_prefix_tokens
    assert stats["removed"] == model.token_reducer.removal_counts(4, 36) == [18, 9, 4, 2]
    assert stats["tokens"] == [t + prefix for t in (36, 18, 9, 5, 3)]


@pytest.mark.parametrize("rule", POSITION_RULES)
@pytest.mark.parametrize("reducer", [n for n in SETTINGS if n != "none"])
def test_sizes_sources_and_positions_after_every_merge(reducer, rule, monkeypatch):
    """Sizes add up, each patch is in one token, prefix tokens stay first (merge_checks); and every
    token's position is one of its patches' (destination) or their size-weighted mean."""
    counts = check_every_merge(monkeypatch) if reducer not in DROPS_TOKENS else [0]
    model = make("beit")
    tokenreduce.apply(model, reducer, adapter_options={"merged_position": rule}, **SETTINGS[reducer], trace_source=True)
    with torch.no_grad():
        model(images(batch=3))
    state = model._tokenreduce.last_state
    assert counts
    coords = torch.cat([torch.zeros(1, 2), grid_positions((6, 6))])
    members = source_matrix(state.source, state.final_tokens)
    mean = members @ coords / members.sum(-1, keepdim=True)
    if rule == "mean" or reducer in DROPS_TOKENS:
        torch.testing.assert_close(state.positions, mean, rtol=0, atol=1e-5)
    else:
        hits = ((state.positions.unsqueeze(2) == coords).all(-1) & (members > 0)).any(-1)
        if reducer == "evit":  # the fused token has no destination: the mean
            hits |= ((state.positions - mean).abs() < 1e-5).all(-1)
        assert hits.all()


# --- the plain-loop reference -----------------------------------------------------------------------
def _tables(model, block):
    """(offset grid [2H-1, 2W-1, heads], class entries [3, heads]) that a block's attention adds, read
    from the model's modules as timm defines them."""
    attn = block.attn
    if isinstance(model, Beit):
        sources = [m for m in (attn if attn.relative_position_bias_table is not None else None, model.rel_pos_bias)
                   if m is not None]
    else:
        sources = [attn.rel_pos if attn.rel_pos is not None else model.shared_rel_pos]
    grid, prefix = 0, 0
    for m in sources:
        if isinstance(m, RelPosMlp):
            values = m.bias_act(m.mlp(m.rel_coords_log))
            grid = grid + (values if m.bias_gain is None else m.bias_gain * values)
        else:
            table = m.relative_position_bias_table
            grid = grid + table[:121].reshape(11, 11, -1)  # (2 * 6 - 1) ** 2 offsets
            prefix = prefix + (table[121:] if len(table) > 121 else 0)
    return grid, prefix


def _bilinear(grid, dr, dc):
    """The table at a (possibly fractional) offset, row by row then column by column."""
    r, c = dr + 5, dc + 5
    r0, c0 = min(math.floor(r), 10), min(math.floor(c), 10)
    fr, fc = r - r0, c - c0
    r1, c1 = min(r0 + 1, 10), min(c0 + 1, 10)
    return ((1 - fr) * (1 - fc) * grid[r0, c0] + (1 - fr) * fc * grid[r0, c1]
            + fr * (1 - fc) * grid[r1, c0] + fr * fc * grid[r1, c1])


def _bias_matrix(grid, prefix, pos, num_prefix):
    n = len(pos)
    heads = grid.shape[-1]
    bias = torch.zeros(heads, n, n)
    for i in range(n):
        for j in range(n):
            if i >= num_prefix and j >= num_prefix:
                bias[:, i, j] = _bilinear(grid, pos[i][0] - pos[j][0], pos[i][1] - pos[j][1])
            elif isinstance(prefix, torch.Tensor):  # class to patch, patch to class, class to class
                bias[:, i, j] = prefix[0 if j >= num_prefix else 1 if i >= num_prefix else 2]
    return bias


def _reference_tome(model, x, r, rule):
    """ToMe through a BEiT or relative-position ViT as a plain loop from methods.md: attention with
    the relative bias of each pair's carried positions and the log-size bias, bipartite matching on
    the keys, size-weighted merge, positions carried by `rule`."""
    num_prefix = model.num_prefix_tokens
    tokens = model.patch_embed(x)
    if model.cls_token is not None:
        tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], 1)
    if getattr(model, "pos_embed", None) is not None:
        tokens = tokens + model.pos_embed
    outputs = []
    for b in range(len(x)):
        t = tokens[b : b + 1]
        sizes = torch.ones(t.shape[1])
        pos = [(0.0, 0.0)] * num_prefix + [(float(i), float(j)) for i in range(6) for j in range(6)]
        for blk in model.blocks:
            attn = blk.attn
            post_norm = not hasattr(blk, "ls1") and not hasattr(blk, "gamma_1")
            h = t if post_norm else blk.norm1(t)
            n = h.shape[1]
            bias = None if getattr(attn, "q_bias", None) is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            bias = attn.qkv.bias if bias is None else bias
            q, k, v = torch.nn.functional.linear(h, attn.qkv.weight, bias).reshape(1, n, 3, attn.num_heads, -1) \
                .permute(2, 0, 3, 1, 4)
            grid, prefix = _tables(model, blk)
            logits = (q * attn.scale) @ k.transpose(-2, -1) + _bias_matrix(grid, prefix, pos, num_prefix) + sizes.log()
            y = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(1, n, -1))
            if post_norm:
                t = t + blk.norm1(y)
            else:
                t = t + (blk.ls1(y) if hasattr(blk, "ls1") else blk.gamma_1 * y)
            groups = tome_groups(k.mean(1)[0], r, num_prefix)
            new_t, new_sizes, new_pos = [], [], []
            for group in groups:
                w = sizes[group]
                new_t.append((t[0, group] * w[:, None]).sum(0) / w.sum())
                new_sizes.append(w.sum())
                if rule == "mean":
                    total = float(w.sum())
                    new_pos.append(tuple(sum(pos[g][d] * float(sizes[g]) for g in group) / total for d in (0, 1)))
                else:
                    new_pos.append(pos[group[0]])
            t, sizes, pos = torch.stack(new_t)[None], torch.stack(new_sizes), new_pos
            if post_norm:
                t = t + blk.norm2(blk.mlp(t))
            else:
                y = blk.mlp(blk.norm2(t))
                t = t + (blk.ls2(y) if hasattr(blk, "ls2") else blk.gamma_2 * y)
        t = model.norm(t)
        if model.global_pool == "avg":
            pooled = (t[0, num_prefix:] * sizes[num_prefix:, None]).sum(0) / sizes[num_prefix:].sum()
        else:
            pooled = t[0, 0]
        outputs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outputs)


@pytest.mark.parametrize("rule", POSITION_RULES)
@pytest.mark.parametrize("name", ["beit", "relpos", "beit_shared", "rpn", "relpos_table"])
def test_tome_equals_a_plain_loop(name, rule):
    model = make(name)
    x = images()
    with torch.no_grad():
        want = _reference_tome(model, x, r=6, rule=rule)
        got = tokenreduce.apply(model, "tome", r=6, adapter_options={"merged_position": rule})(x)
    prefix = model.num_prefix_tokens
    assert tokenreduce.stats(model)["tokens"] == [t + prefix for t in (36, 30, 24, 18, 12)]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_two_position_rules_differ_and_destination_is_the_default():
    model = make("beit")
    with torch.no_grad():
        default = tokenreduce.apply(model, "tome", r=6)(images())
        assert model._tokenreduce.options == {"merged_position": "destination"}
        mean = tokenreduce.apply(model, "tome", r=6, adapter_options={"merged_position": "mean"})(images())
    assert not torch.allclose(default, mean)


# --- every reducer, the invariants --------------------------------------------------------------------
@pytest.mark.parametrize("reducer", sorted(SETTINGS))
@pytest.mark.parametrize("name", ["beit", "relpos"])
def test_every_reducer_runs_or_is_refused_before_any_compute(reducer, name):
    model = make(name)
    calls = []
    model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    if name == "relpos" and reducer in NEEDS_CLASS_TOKEN:  # no class token
        with pytest.raises(ConfigError, match="class token"):
            tokenreduce.apply(model, reducer, **SETTINGS[reducer])
        assert not calls and not hasattr(model, "_tokenreduce")
        return
    tokenreduce.apply(model, reducer, **SETTINGS[reducer])
    with torch.no_grad():
        out = model(images())
    assert torch.isfinite(out).all()
    assert reducer == "none" or sum(tokenreduce.stats(model)["removed"]) > 0


@pytest.mark.parametrize("rule", POSITION_RULES)
@pytest.mark.parametrize("reducer", [n for n in SETTINGS if n not in {"random"}])
def test_sample_output_does_not_depend_on_the_batch(reducer, rule):
    model = tokenreduce.apply(make("relpos_table"), reducer, adapter_options={"merged_position": rule},
                              **SETTINGS[reducer])
    check_batch_independence(model, images(batch=4))


@pytest.mark.parametrize("name", ["beit", "relpos", "srelpos"])
@pytest.mark.parametrize("reducer", ["tome", "mctf", "dynamicvit"])
def test_gradients_reach_every_parameter(name, reducer):
    model = tokenreduce.apply(make(name, drop_path_rate=0.1), reducer, **SETTINGS[reducer],
                              adapter_options={"merged_position": "mean"}).train()
    missing = parameters_without_gradient(model, images())
    # without a class token, the bias MLP's output bias adds one constant to every logit of a row,
    # which the softmax cancels: its gradient is zero in the unreduced model too
    assert not [n for n in missing if not n.endswith("rel_pos.mlp.fc2.bias")]


@pytest.mark.parametrize("reducer", ["tome", "mctf"])
def test_grad_checkpointing_gives_the_same_gradients(reducer):
    model = tokenreduce.apply(make("beit"), reducer, **SETTINGS[reducer]).train()
    check_grad_checkpointing(model, images())


@pytest.mark.parametrize("name", ["beit", "relpos"])
@pytest.mark.parametrize("reducer", ["tome", "mctf", "norm"])
def test_bfloat16_runs_with_the_same_token_counts(name, reducer):
    model = tokenreduce.apply(make(name), reducer, **SETTINGS[reducer], adapter_options={"merged_position": "mean"})
    state = check_bfloat16(model, images())
    assert state.positions.dtype == torch.float32


@pytest.mark.parametrize("name", ["beit", "beit_shared", "relpos", "srelpos", "relpos_cls"])
@pytest.mark.parametrize("reducer", ["tome", "mctf", "dynamicvit"])
def test_analytic_macs_equal_flop_counter(name, reducer):
    """At batch 1, where an MLP bias (evaluated once per pass) costs what one image costs."""
    model = tokenreduce.apply(make(name), reducer, **SETTINGS[reducer])
    flops = counted_flops(model, images(batch=1))
    assert tokenreduce.stats(model)["macs"] * 2 == flops


# --- claims and refusals --------------------------------------------------------------------------------
def test_the_adapter_claims_both_classes_and_describes_them():
    assert adapter_for(make("beit")).name == adapter_for(make("relpos")).name == "timm_relpos"
    info = describe(make("relpos_cls"))
    assert info.num_prefix == 1 and info.has_class_token and info.depth == 4
    assert not describe(make("relpos")).has_class_token
    with pytest.raises(UnsupportedModelError, match="not a timm Beit or VisionTransformerRelPos"):
        describe(torch.nn.Linear(2, 2))


def test_a_window_that_is_not_the_grid_is_refused():
    model = make("beit")
    model.blocks[1].attn.window_size = (3, 3)
    check_refused(model, ["block 1", "window (3, 3)", "patch grid (6, 6)"], r=2)


def test_an_unsupported_pooling_is_refused():
    model = VisionTransformerRelPos(img_size=96, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    model.global_pool = "max"
    check_refused(model, ["global_pool='max'", "'avg'"], r=2)
    assert isinstance(make("beit"), Beit)


def test_adapter_options_are_checked():
    with pytest.raises(ConfigError, match="merged_position='nearest' is invalid; allowed: 'destination', 'mean'"):
        tokenreduce.apply(make("beit"), "tome", r=2, adapter_options={"merged_position": "nearest"})


def test_intermediates_carry_the_reduced_tokens():
    model = tokenreduce.apply(make("beit"), "tome", r=6)
    with torch.no_grad():
        final, taken = model.forward_intermediates(images(), indices=[0, 3], output_fmt="NLC")
    assert [t.shape[1] for t in taken] == [30, 12]  # patch tokens leaving blocks 0 and 3
    assert final.shape[1] == 13


def test_interpolation_at_whole_offsets_is_the_entry_itself(monkeypatch):
    """The four-read path (taken under torch.compile) gives the one-read path's bias bit for bit."""
    table = OffsetTable(grid=torch.randn(11, 11, 2), prefix=torch.randn(3, 2))
    positions = grid_positions((6, 6))[torch.randperm(36)[:20]][None]
    one = Offsets.of(positions, (6, 6))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    four = Offsets.of(positions, (6, 6))
    assert one.weight is None and four.weight is not None
    assert torch.equal(one.read(table, 1), four.read(table, 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["beit", "relpos"])
def test_torch_compile_fullgraph_gives_the_same_output(name):
    model = tokenreduce.apply(make(name), "tome", r=6, adapter_options={"merged_position": "mean"})
    x = images()
    with torch.no_grad():
        want = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
