"""MCTF: schedule and fixture counts, the multi-criteria bidirectional matching against a brute-force
reference, the one-step-ahead attention, MACs, the consistency loss and the invariants."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_MODELS, counted_flops, images_for, make_model, run
from merge_checks import check_every_merge
from timm.models.vision_transformer import ResPostBlock

import tokenreduce
from tokenreduce.adapters.timm_vit import TimmBlockOps
from tokenreduce.core.matching import bipartite_soft_matching
from tokenreduce.core.merge import Assignment, combine, combine_attention
from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.losses import draw_teacher_r, mctf_consistency_loss
from tokenreduce.reducers.base import ATTN, create_reducer
from tokenreduce.reducers.mctf import MCTF_FAST, mctf_matching

MCTF_R16 = [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]  # methods.md fixture


# --- the identity and the schedule ------------------------------------------------------------
@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_zero_reduction_is_the_identity(name, mode):
    model = make_model(name)
    images = images_for(model)
    expected = run(model, images)
    tokenreduce.apply(model, "mctf", r=0, mode=mode)
    assert torch.allclose(run(model, images), expected, atol=1e-6, rtol=0)
    assert tokenreduce.stats(model)["removed"] == [0] * len(model.blocks)


@pytest.mark.parametrize("mode", [1, 2])
def test_fixture_token_counts_and_exactly_r_removed(narrow_vit, mode):
    tokenreduce.apply(narrow_vit, "mctf", r=16, mode=mode)
    run(narrow_vit, torch.randn(2, 3, 224, 224))
    st = tokenreduce.stats(narrow_vit)
    assert st["tokens"] == MCTF_R16 + [21]  # tokens in each block's attention, then out of the last
    assert st["removed"] == [0] + [16] * 11  # block 0 is never reduced; each later block fuses its input
    assert narrow_vit._tokenreduce.last_state.removals == [0] + [16] * 11  # block l merges its input
    tokenreduce.remove(narrow_vit)


def test_mode_0_reduces_after_the_mlp(narrow_vit):
    tokenreduce.apply(narrow_vit, "mctf", r=16, mode=0)
    run(narrow_vit, torch.randn(1, 3, 224, 224))
    st = tokenreduce.stats(narrow_vit)
    assert st["tokens"] == [197] + MCTF_R16[:-1] + [21]  # each block merges its own output
    tokenreduce.remove(narrow_vit)


def test_mctf_fast_counts(narrow_vit):
    # int(196 * .35) = 68, int(128 * .35) = 44, int(84 * .35) = 29
    tokenreduce.apply(narrow_vit, "mctf", **MCTF_FAST)
    run(narrow_vit, torch.randn(1, 3, 224, 224))
    assert tokenreduce.stats(narrow_vit)["tokens"] == [197] * 3 + [129] * 3 + [85] * 3 + [56] * 4
    tokenreduce.remove(narrow_vit)


def test_cap_and_ten_token_floor():
    # test_vit: 100 patches + CLS, 6 blocks. r=50: min(r, T//2, T+1-10) per layer
    model = make_model("test_vit")
    tokenreduce.apply(model, "mctf", r=50)
    run(model, images_for(model))
    assert tokenreduce.stats(model)["tokens"] == [101, 51, 26, 14, 10, 10, 10]
    reducer = create_reducer("mctf", r=50, min_tokens=0)
    reducer.check_model(model._tokenreduce.info)
    assert reducer.removal_counts(6, 100) == [0, 50, 25, 12, 6, 3]


def test_fractional_schedule():
    assert Schedule(r=0.35, fractional=True).removal_counts(3, 196, lambda t: t) == [68, 44, 29]
    with pytest.raises(tokenreduce.ConfigError, match="r=0.35"):
        Schedule(r=0.35)  # fractions only where the method allows them
    with pytest.raises(tokenreduce.ConfigError, match="r=1.5"):
        Schedule(r=1.5, fractional=True)


# --- the matching ---------------------------------------------------------------------------------
def brute_force_mctf(metric, received, sizes, r, num_prefix, taus, bidirectional):
    """MCTF's matching for one image with Python loops: the groups of token indices, in output order."""
    n = metric.shape[0]
    m = metric.double()
    a_set = [i for i in range(num_prefix, n) if i % 2 == 0]
    b_set = [i for i in range(num_prefix, n) if i % 2 == 1]
    inv_info = [1 / float(v) for v in received]
    inv_size = [1 / float(v) for v in sizes]

    def score(i, j):
        s = 1.0
        if taus[0]:
            cos = float(m[i] @ m[j]) / (float(m[i].norm()) * float(m[j].norm()))
            s *= ((cos + 1) / 2) ** (1 / taus[0])
        if taus[1]:
            s *= (inv_info[i] / max(inv_info) * inv_info[j] / max(inv_info)) ** (1 / taus[1])
        if taus[2]:
            s *= (inv_size[i] / max(inv_size) * inv_size[j] / max(inv_size)) ** (1 / taus[2])
        return s

    r1 = r // 2 if bidirectional else r
    best = {}
    for a in a_set:
        values = [score(a, b) for b in b_set]
        best[a] = (max(values), b_set[values.index(max(values))])
    ranked = sorted(a_set, key=lambda a: -best[a][0])  # stable: ties keep index order
    merged_a = set(ranked[:r1])
    groups = {b: [b] for b in b_set}
    for a in merged_a:
        groups[best[a][1]].append(a)
    kept_a = [a for a in a_set if a not in merged_a]
    a_groups = {a: [a] for a in kept_a}
    if not bidirectional:
        return [[i] for i in range(num_prefix)] + [a_groups[a] for a in kept_a] + [groups[b] for b in b_set]
    best2 = {}
    for b in b_set:
        values = [score(a, b) for a in kept_a]
        best2[b] = (max(values), kept_a[values.index(max(values))])
    ranked_b = sorted(b_set, key=lambda b: -best2[b][0])
    for b in ranked_b[: r - r1]:
        a_groups[best2[b][1]] += groups[b]
    return (
        [[i] for i in range(num_prefix)] + [a_groups[a] for a in kept_a] + [groups[b] for b in ranked_b[r - r1 :]]
    )


def groups_of(assignment: Assignment, sample: int) -> list[list[int]]:
    dest = assignment.dest[sample].tolist()
    return [sorted(i for i, d in enumerate(dest) if d == slot) for slot in range(assignment.n_out)]


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("r", [1, 4, 9])
def test_matching_equals_brute_force(num_prefix, bidirectional, r):
    gen = torch.Generator().manual_seed(r + 10 * num_prefix)
    batch, n = 2, 21
    metric = torch.randn(batch, n, 8, generator=gen)
    received = torch.rand(batch, n, generator=gen) + 0.05
    sizes = torch.randint(1, 5, (batch, n, 1), generator=gen).float()
    taus = (1.0, 20.0, 40.0)
    assignment = mctf_matching(metric, r, num_prefix, received, sizes, *taus, bidirectional)
    assert assignment.n_out == n - r  # exactly r removed
    for s in range(batch):
        expected = brute_force_mctf(metric[s], received[s], sizes[s, :, 0], r, num_prefix, taus, bidirectional)
        assert groups_of(assignment, s) == [sorted(g) for g in expected]
        assert assignment.merged[s].sum() == r
        assert not assignment.merged[s, :num_prefix].any()


@pytest.mark.parametrize("num_prefix", [0, 1, 4])
def test_one_direction_with_huge_temperatures_is_tome(num_prefix):
    gen = torch.Generator().manual_seed(num_prefix)
    metric = torch.randn(3, 40, 16, generator=gen)
    received = torch.rand(3, 40, generator=gen) + 0.01
    sizes = torch.randint(1, 9, (3, 40, 1), generator=gen).float()
    for tau in (1e9, math.inf):
        for r in (1, 7, 18):
            ours = mctf_matching(metric, r, num_prefix, received, sizes, 1.0, tau, tau, bidirectional=False)
            tome = bipartite_soft_matching(metric, r, num_prefix)
            assert ours.n_out == tome.n_out
            assert torch.equal(ours.dest, tome.dest)
            assert torch.equal(ours.merged, tome.merged)


def test_criteria_change_the_selection():
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(1, 41, 16, generator=gen)
    received = torch.rand(1, 41, generator=gen) ** 4 + 1e-3
    plain = mctf_matching(metric, 8, 1, None, None, 1.0, 0.0, 0.0)
    informed = mctf_matching(metric, 8, 1, received, None, 1.0, 1.0, 0.0)
    assert not torch.equal(plain.dest, informed.dest)


# --- one-step-ahead attention ---------------------------------------------------------------------
def brute_force_merged_attention(attn, dest, n_out, w):
    b, h, n, _ = attn.shape
    out = torch.zeros(b, h, n_out, n_out, dtype=torch.float64)
    for s in range(b):
        for head in range(h):
            for row in range(n_out):
                members = [q for q in range(n) if dest[s, q] == row]
                total = sum(float(w[s, q]) for q in members)
                for col in range(n_out):
                    keys = [k for k in range(n) if dest[s, k] == col]
                    out[s, head, row, col] = sum(float(w[s, q]) * float(attn[s, head, q, keys].sum()) for q in members)
                    out[s, head, row, col] /= total
    return out


def test_merged_attention_matches_definition_and_rows_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 2, 9, 9, generator=gen).softmax(dim=-1)
    metric = torch.randn(2, 9, 4, generator=gen)
    received = attn.mean(dim=(1, 2))
    sizes = torch.randint(1, 4, (2, 9, 1), generator=gen).float()
    assignment = mctf_matching(metric, 3, 1, received, sizes)
    merged = combine_attention(attn, sizes, assignment, "wavg", received.unsqueeze(-1))
    expected = brute_force_merged_attention(attn, assignment.dest, assignment.n_out, sizes[..., 0] * received)
    assert torch.allclose(merged.double(), expected, atol=1e-6)
    assert torch.allclose(merged.sum(dim=-1), torch.ones(2, 2, 6), atol=1e-6)
    # the general path (slots without a representative, dropped tokens) gives the same map
    assert assignment.represented
    general = Assignment(dest=assignment.dest, n_out=assignment.n_out, merged=assignment.merged)
    assert torch.allclose(combine_attention(attn, sizes, general, "wavg", received.unsqueeze(-1)), merged, atol=1e-6)
    assert torch.allclose(combine_attention(attn, sizes, assignment, "mean").sum(-1), torch.ones(2, 2, 6), atol=1e-6)
    # dropped tokens (slot n_out) lose their rows and columns
    dest = assignment.dest.clone()
    first_merged = assignment.merged.float().argmax(dim=1)  # its slot keeps its representative
    dest[torch.arange(2), first_merged] = assignment.n_out
    dropping = Assignment(dest=dest, n_out=assignment.n_out)
    expected = brute_force_merged_attention(attn, dest, assignment.n_out, sizes[..., 0] * received)
    merged = combine_attention(attn, sizes, dropping, "wavg", received.unsqueeze(-1))
    assert torch.allclose(merged.double(), expected, atol=1e-6)


def test_reused_attention_rows_sum_to_one_in_the_model(narrow_vit, monkeypatch):
    seen = []
    original = TimmBlockOps.attn_output

    def spy(self, probs, v, h):
        seen.append(probs.sum(dim=-1))
        return original(self, probs, v, h)

    monkeypatch.setattr(TimmBlockOps, "attn_output", spy)
    tokenreduce.apply(narrow_vit, "mctf", r=16, mode=1)
    run(narrow_vit, torch.randn(2, 3, 224, 224))
    tokenreduce.remove(narrow_vit)
    assert len(seen) == 11
    for sums in seen:
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


def test_pieces_compose_to_the_attention_step():
    model = make_model("test_vit4")  # LayerScale and RMSNorm
    ops = TimmBlockOps(model.blocks[1])
    x = torch.randn(2, 17, model.embed_dim)
    bias = torch.rand(2, 1, 1, 17).log()
    expected, signals = ops.attention(x, bias, frozenset({ATTN}))
    h = ops.attn_input(x)
    probs = ops.attn_logits(*ops.attn_qk(h), bias).softmax(dim=-1)
    assert torch.allclose(probs, signals.attn, atol=1e-6)
    assert torch.allclose(ops.attn_residual(x, ops.attn_output(probs, ops.attn_values(h), h)), expected, atol=1e-5)


def duplicated_tokens(dim: int, seed: int = 0) -> torch.Tensor:
    """CLS + 12 tokens where token 2 repeats token 1 exactly (a B token and an A token)."""
    x = torch.randn(2, 13, dim, generator=torch.Generator().manual_seed(seed))
    x[:, 2] = x[:, 1]
    return x


@pytest.mark.parametrize("block_fn", ["pre", "post"])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_merging_duplicates_with_proportional_attention_changes_nothing(block_fn, mode):
    kwargs = {"block_fn": ResPostBlock} if block_fn == "post" else {}
    model = make_model("test_vit", **kwargs)
    block = model.blocks[1]
    x = duplicated_tokens(model.embed_dim)
    with torch.no_grad():
        expected = block(x)
        reducer = create_reducer("mctf", r=1, mode=mode, tau_info=0, tau_size=0, trace_source=True)
        state = ReductionState.start(x, 1, [0, 1], prop_attn=True, trace_source=True)
        state.begin_layer(x.shape[1])
        out = reducer.block_forward(TimmBlockOps(block), x, state, 1, 1)
    assert out.shape[1] == 12
    assert state.source[:, 1].tolist() == state.source[:, 2].tolist()  # the duplicates merged
    assert torch.allclose(out.gather(1, state.source.unsqueeze(-1).expand_as(x)), expected, atol=1e-5)


def test_block_matches_on_the_probe_attention_received_and_sizes():
    model = make_model("test_vit")
    block = model.blocks[2]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 31, model.embed_dim, generator=gen)
    sizes = torch.randint(1, 6, (2, 31, 1), generator=gen).float()
    sizes[:, 0] = 1
    with torch.no_grad():
        # the attention of the block input with log-size bias, averaged over heads and all query rows
        h = block.norm1(x)
        q, k, _ = block.attn.qkv(h).reshape(2, 31, 3, 2, 32).permute(2, 0, 3, 1, 4)
        logits = (q * block.attn.scale) @ k.transpose(-2, -1) + sizes.log().transpose(1, 2).unsqueeze(1)
        received = logits.softmax(dim=-1).mean(dim=(1, 2))
        expected = mctf_matching(x, 6, 1, received, sizes)
        state = ReductionState.start(x, 1, [0, 0, 6], prop_attn=True, trace_source=True)
        state.sizes = sizes
        state.begin_layer(31)
        create_reducer("mctf", r=6).block_forward(TimmBlockOps(block), x, state, 2, 6)
    assert torch.equal(state.source, expected.dest)
    assert torch.equal(state.sizes, combine(x, sizes, expected)[1])


@pytest.mark.parametrize("layer", [1, 3, 5])
def test_modes_one_and_two_remove_the_same_tokens(layer):
    model = make_model("test_vit")
    images = images_for(model)
    sources, outputs = [], []
    for mode in (1, 2):
        tokenreduce.apply(model, "mctf", r=12, layers=[layer], mode=mode, trace_source=True)
        outputs.append(run(model, images))
        sources.append(model._tokenreduce.last_state.source)
    assert torch.equal(sources[0], sources[1])
    assert not torch.equal(outputs[0], outputs[1])  # mode 1 approximates the attention


# --- invariants -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY_MODELS)
def test_sizes_sources_and_prefix(name, monkeypatch):
    model = make_model(name)
    tokenreduce.apply(model, "mctf", r=12, trace_source=True)
    checked = check_every_merge(monkeypatch)
    run(model, images_for(model))
    assert len(checked) == len(model.blocks) - 1
    state = model._tokenreduce.last_state
    prefix, n_final = state.num_prefix, state.final_tokens
    patches = state.records[0].tokens_attn - prefix
    assert torch.all(state.sizes[:, prefix:].sum(dim=1) == patches)
    assert torch.all(state.sizes[:, :prefix] == 1)
    assert state.source[:, :prefix].tolist() == [list(range(prefix))] * 2  # prefix never moves or merges
    assert int(state.source.max()) < n_final  # every input token lives in exactly one token
    counts = torch.zeros(2, n_final).scatter_add_(1, state.source, torch.ones_like(state.source, dtype=torch.float))
    assert torch.equal(counts, state.sizes[..., 0])


def test_samples_do_not_depend_on_each_other():
    model = make_model("test_vit")
    tokenreduce.apply(model, "mctf", r=16)
    images = images_for(model, batch=3)
    alone = run(model, images[:1])
    together = run(model, images)
    other = run(model, torch.cat([images[:1], images[2:]]))
    assert torch.allclose(alone, together[:1], atol=1e-5)
    assert torch.allclose(alone, other[:1], atol=1e-5)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_macs_match_a_flop_counter(narrow_vit, mode):
    tokenreduce.apply(narrow_vit, "mctf", r=16, mode=mode)
    flops = counted_flops(narrow_vit, torch.randn(1, 3, 224, 224))
    st = tokenreduce.stats(narrow_vit)
    assert st["macs"] == flops // 2
    assert st["macs_parts"]["reducer"] > 0
    tokenreduce.remove(narrow_vit)


def test_one_step_ahead_costs_less_than_recompute(narrow_vit):
    macs = {}
    for mode in (1, 2):
        tokenreduce.apply(narrow_vit, "mctf", r=16, mode=mode)
        run(narrow_vit, torch.randn(1, 3, 224, 224))
        macs[mode] = tokenreduce.stats(narrow_vit)["macs"]
    tokenreduce.remove(narrow_vit)
    # each reducing block: mode 1 skips q/k and q.k^T on the merged tokens that mode 2 recomputes
    dim, qk = 48, 2 * 48 * 48
    expected = sum(n * qk + n * n * dim for n in MCTF_R16[1:])
    assert macs[2] - macs[1] == expected


def test_pooling_modes():
    x = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [0.0, -2.0]]])
    assignment = Assignment(dest=torch.tensor([[0, 1, 1]]), n_out=2, merged=torch.tensor([[False, False, True]]))
    out, sizes = combine(x, None, assignment, "max")
    assert out.tolist() == [[[1.0, 0.0], [3.0, 4.0]]] and sizes[..., 0].tolist() == [[1.0, 2.0]]
    weights = torch.tensor([[[1.0], [1.0], [3.0]]])
    out, _ = combine(x, None, assignment, "wavg", weights=weights)
    assert out[0, 1].tolist() == [0.75, -0.5]
    model = make_model("test_vit")
    for pooling in ("size", "mean", "max"):
        tokenreduce.apply(model, "mctf", r=8, pooling=pooling)
        assert torch.isfinite(run(model, images_for(model))).all()


# --- consistency loss ----------------------------------------------------------------------------
def test_consistency_loss_is_zero_with_the_same_r_and_no_randomness():
    model = make_model("test_vit")
    tokenreduce.apply(model, "mctf", r=8)
    images, targets = images_for(model, batch=4), torch.tensor([1, 5, 7, 9])
    out = mctf_consistency_loss(model, images, targets, r_teacher=8, confidence=0.0)
    assert out["confident"] == 1.0
    assert out["consistency"] == 0.0
    assert torch.equal(out["ce_student"], out["ce_teacher"])
    assert torch.allclose(out["loss"], out["ce_student"] + out["ce_teacher"])
    assert tokenreduce.stats(model)["removed"][1] == 8  # the student pass ran last


def test_consistency_loss_terms_and_gradients():
    model = make_model("test_vit")
    tokenreduce.apply(model, "mctf", r=8)
    images, targets = images_for(model, batch=4), torch.tensor([1, 5, 7, 9])
    out = mctf_consistency_loss(model, images, targets, r_teacher=2, confidence=0.0)
    assert out["consistency"] > 0
    assert int(out["r_teacher"]) == 2
    out["loss"].backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.zero_grad()
    # no confident sample: no consistency term
    out = mctf_consistency_loss(model, images, targets, r_teacher=2, confidence=1.0)
    assert out["consistency"] == 0 and out["confident"] == 0
    with pytest.raises(tokenreduce.ConfigError, match="labels"):
        mctf_consistency_loss(model, images, torch.rand(4, 1000), r_teacher=2)
    soft = torch.nn.functional.one_hot(targets, 1000).float()
    assert torch.isfinite(mctf_consistency_loss(model, images, soft, labels=targets, r_teacher=2)["loss"])
    # mixup: a sample is confident when its two classes together pass the threshold
    logits = run(model, images)
    top2 = logits.topk(2, dim=1).indices
    p = logits.softmax(dim=1).gather(1, top2)
    threshold = float(p[:, 0].max()) + 1e-6  # no sample passes on its first class alone
    out = mctf_consistency_loss(model, images, soft, labels=top2, r_teacher=2, confidence=threshold)
    assert out["confident"] == float((p.sum(dim=1) > threshold).float().mean())
    tokenreduce.apply(model, "tome", r=8)
    with pytest.raises(tokenreduce.ConfigError, match="mctf"):
        mctf_consistency_loss(model, images, targets)


def test_teacher_r_draws():
    gen = torch.Generator().manual_seed(0)
    draws = {draw_teacher_r(8, gen) for _ in range(200)}
    assert draws == set(range(8))
    fractions = {draw_teacher_r(0.15, gen) for _ in range(300)}
    assert min(fractions) == 0.0 and max(fractions) == 0.14
    assert draw_teacher_r(8, torch.Generator().manual_seed(5)) == draw_teacher_r(8, torch.Generator().manual_seed(5))
    with pytest.raises(tokenreduce.ConfigError, match="r_max"):
        draw_teacher_r(0)


# --- bad parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, match",
    [
        ({"mode": 3}, "mode=3"),
        ({"mode": True}, "mode=True"),
        ({"pooling": "sum"}, "pooling='sum'"),
        ({"tau_sim": -1}, "tau_sim=-1"),
        ({"tau_info": "hot"}, "tau_info='hot'"),
        ({"r": -2}, "r=-2"),
        ({"r": 1.5}, "r=1.5"),
        ({"min_tokens": -1}, "min_tokens=-1"),
        ({"bidirectional": "yes"}, "bidirectional='yes'"),
        ({"speed": 2}, "unknown parameter"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(tokenreduce.ConfigError, match=match):
        create_reducer("mctf", **params)


def test_layers_beyond_the_model():
    model = make_model("test_vit")
    with pytest.raises(tokenreduce.ConfigError, match="layers"):
        tokenreduce.apply(model, "mctf", r=4, layers=[2, 9])
