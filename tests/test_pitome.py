"""PiToMe: the energy score (ELU and Gaussian) and the matching modes against loops, the protected and
merged tokens on hand-made keys, the text variant's layer against loops, and the methods.md invariants,
fixtures and errors on real timm models."""

import math

import pytest
import timm
import torch
from conftest import TINY_MODELS, counted_flops, images_for, make_model, narrow_vit_b_geometry
from reduction_checks import check_invariants, duplicate_pairs_through_two_blocks, groups, record_layers

import tokenreduce
from tokenreduce.core.energy import energy_score, layer_margin
from tokenreduce.core.matching import ordered_bipartite_matching
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import Signals
from tokenreduce.reducers.pitome import PiToMe, family_margin, preset_layer_modes

KEEP_090 = [196, 177, 160, 144, 130, 117, 106, 96, 87, 79, 72, 65, 59]
KEEP_0925 = [196, 182, 169, 157, 146, 136, 126, 117, 109, 101, 94, 87, 81]


def cosine(u, v):
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


def energy_loop(metric, margin, alpha, kernel):
    batch, tokens, _ = metric.shape
    out = torch.zeros(batch, tokens)
    for b in range(batch):
        for i in range(tokens):
            total = 0.0
            for j in range(tokens):
                s = cosine(metric[b, i], metric[b, j])
                if kernel == "elu":
                    total += s - margin if s > margin else alpha * (math.exp(s - margin) - 1)
                else:
                    total += math.exp(-0.5 * ((1 - s) / (1 - margin)) ** 2)
            out[b, i] = total / tokens
    return out


@pytest.mark.parametrize("kernel, margin, alpha", [("elu", 0.75, 1.0), ("elu", 0.3, 0.5), ("elu", 0.9, 2.0),
                                                   ("gaussian", 0.5, 1.0), ("gaussian", 0.9, 1.0)])
def test_energy_score_equals_a_loop(kernel, margin, alpha):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 3, 6, generator=g)  # clustered keys, so similarities fall on both sides of m
    metric = base.repeat_interleave(3, dim=1) + 0.5 * torch.randn(2, 9, 6, generator=g)
    got = energy_score(metric, margin, alpha, kernel)
    assert got.shape == (2, 9) and got.dtype == torch.float32
    torch.testing.assert_close(got, energy_loop(metric, margin, alpha, kernel), rtol=1e-5, atol=1e-6)


def test_margin_shrinks_linearly_with_depth():
    assert [layer_margin(0.9, layer, 12) for layer in (0, 3, 6, 11)] == pytest.approx([0.9, 0.675, 0.45, 0.075])


def test_energy_score_refuses_unknown_kernels_and_a_degenerate_gaussian():
    with pytest.raises(ConfigError, match="kernel='cosine'.*elu, gaussian"):
        energy_score(torch.randn(1, 3, 2), 0.5, kernel="cosine")
    with pytest.raises(ConfigError, match="margin=1.0.*below 1"):
        energy_score(torch.randn(1, 3, 2), 1.0, kernel="gaussian")


def test_gaussian_energy_on_a_hand_made_metric_equals_a_loop():
    """Integer keys of different lengths: pairs at cosine 1, 0.8, 0.6, 0 and negative ones."""
    metric = torch.tensor([[[2.0, 0, 0], [3, 4, 0], [0, 5, 0], [0, 0, 1], [-1, 0, 0], [4, 0, 3]]])
    for margin in (0.0, 0.3, 0.75):
        got = energy_score(metric, margin, kernel="gaussian")
        torch.testing.assert_close(got, energy_loop(metric, margin, 1.0, "gaussian"), rtol=1e-6, atol=1e-7)


def test_gaussian_energy_of_three_tokens_by_hand():
    # unit directions (1, 0), (0.6, 0.8), (0, 1): S_01 = 0.6, S_02 = 0, S_12 = 0.8; m = 0.5 -> sigma = 0.5,
    # so f(1) = 1, f(0.6) = exp(-0.32), f(0.8) = exp(-0.08), f(0) = exp(-2)
    metric = torch.tensor([[[2.0, 0.0], [3.0, 4.0], [0.0, 0.5]]])
    f06, f08, f0 = math.exp(-0.32), math.exp(-0.08), math.exp(-2)
    want = torch.tensor([[(1 + f06 + f0) / 3, (1 + f06 + f08) / 3, (1 + f0 + f08) / 3]])
    torch.testing.assert_close(energy_score(metric, 0.5, kernel="gaussian"), want, rtol=1e-6, atol=1e-7)
    assert energy_score(metric, 0.5, kernel="gaussian").argsort(descending=True).tolist() == [[1, 2, 0]]


def matching_loop(metric, energy, r, num_prefix, protect, split="alternate"):
    """The expected output slot of every token, by the rules of methods.md, one sample at a time."""
    batch, n, _ = metric.shape
    dest = torch.empty(batch, n, dtype=torch.long)
    for b in range(batch):
        order = sorted(range(n - num_prefix), key=lambda i: -energy[b, i].item())
        cands = order[: 2 * r] if protect else order
        kept = order[2 * r :] if protect else []
        half = len(cands) - len(cands) // 2
        a, bb = (cands[0::2], cands[1::2]) if split == "alternate" else (cands[:half], cands[half:])
        key = [metric[b, num_prefix + i] for i in range(n - num_prefix)]
        best = {i: max(bb, key=lambda j, i=i: cosine(key[i], key[j])) for i in a}
        edge = {i: cosine(key[i], key[best[i]]) for i in a}
        merged = set(a) if protect else set(sorted(a, key=lambda i: -edge[i])[:r])
        unmerged = [i for i in a if i not in merged]
        slots = list(range(num_prefix)) + [num_prefix + i for i in kept + unmerged + bb]
        for slot, i in enumerate(slots):
            dest[b, i] = slot
        for i in merged:
            dest[b, num_prefix + i] = slots.index(num_prefix + best[i])
    return dest


@pytest.mark.parametrize("protect, split", [(True, "alternate"), (False, "alternate"), (True, "halves")])
@pytest.mark.parametrize("num_prefix, r", [(1, 3), (2, 4), (0, 5)])
def test_ordered_matching_equals_a_loop(protect, split, num_prefix, r):
    g = torch.Generator().manual_seed(r)
    metric = torch.randn(3, num_prefix + 11, 8, generator=g)
    energy = energy_score(metric[:, num_prefix:], 0.2)
    order = energy.argsort(dim=-1, descending=True, stable=True)
    cands = 2 * r if protect else None
    assignment = ordered_bipartite_matching(metric, r, num_prefix, order, num_candidates=cands, split=split)
    want = matching_loop(metric, energy, r, num_prefix, protect, split)
    assert torch.equal(assignment.dest, want)
    assert assignment.n_out == num_prefix + 11 - r
    assert assignment.merged.sum(1).tolist() == [r] * 3


@pytest.mark.parametrize("kernel", ["elu", "gaussian"])
def test_a_metric_normalised_once_gives_the_same_energy_and_matching(kernel):
    """PiToMe normalises its keys once and passes them on with normalized=True: both steps must give
    exactly what they give when each normalises the raw keys itself."""
    g = torch.Generator().manual_seed(7)
    metric = 3 * torch.randn(2, 1 + 14, 8, generator=g)
    unit = torch.nn.functional.normalize(metric, dim=-1)
    energy = energy_score(metric[:, 1:], 0.3, kernel=kernel)
    torch.testing.assert_close(energy_score(unit[:, 1:], 0.3, kernel=kernel, normalized=True), energy,
                               rtol=0, atol=0)
    order = energy.argsort(dim=-1, descending=True, stable=True)
    want = ordered_bipartite_matching(metric, 4, 1, order, num_candidates=8)
    got = ordered_bipartite_matching(unit, 4, 1, order, num_candidates=8, normalized=True)
    assert torch.equal(got.reps, want.reps) and torch.equal(got.sources, want.sources)
    assert torch.equal(got.slots, want.slots)
    # and normalized=True really skips the normalisation: unscaled keys change the energy
    assert not torch.allclose(energy_score(metric[:, 1:], 0.3, kernel=kernel, normalized=True), energy)


def clustered_keys():
    """Non-prefix keys: a tight cluster of 4 near-duplicates of e0 (spread over the sequence), 5
    loosely similar tokens in another subspace, and one token (e1) orthogonal to all the others."""
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(8)
    tight = [eye[0] + 0.01 * torch.randn(1, generator=g) * eye[2] for _ in range(4)]
    loose = [eye[3] + 0.3 * torch.randn(5, generator=g) @ eye[3:] for _ in range(5)]
    keys = [loose[0], tight[0], loose[1], loose[2], tight[1], loose[3], tight[2], loose[4], tight[3], eye[1]]
    prefix = torch.randn(1, 8, generator=g)
    return torch.cat([prefix, torch.stack(keys)]).unsqueeze(0), [1, 4, 6, 8], 9


@pytest.mark.parametrize("layer_mode", ["protect", "bipartite"])
def test_isolated_token_is_protected_and_the_tight_cluster_merges_first(layer_mode):
    keys, tight, isolated = clustered_keys()
    reducer = PiToMe(ratio=0.8, margin=0.5, layer_modes=[layer_mode] * 4, trace_source=True)
    energy = energy_score(keys[:, 1:], 0.5)[0]
    assert energy.argmin().item() == isolated
    assert set(energy.argsort(descending=True)[:4].tolist()) == set(tight)
    x = torch.randn(1, 11, 16)
    state = ReductionState.start(x, 1, [2] * 4, prop_attn=False, trace_source=True)
    state.begin_layer(11)
    out = reducer.reduce(x, Signals(keys=keys), state, 0, 2)
    slot = state.source[0]
    merged_groups = [[i - 1 for i in range(11) if slot[i] == s] for s in range(out.shape[1])]
    merged_groups = [grp for grp in merged_groups if len(grp) > 1]
    assert out.shape[1] == 9 and sum(len(grp) - 1 for grp in merged_groups) == 2
    assert all(set(grp) <= set(tight) for grp in merged_groups)
    assert state.sizes[0, slot[1 + isolated], 0] == 1
    assert torch.equal(out[0, slot[1 + isolated]], x[0, 1 + isolated])


@pytest.mark.parametrize("layer, layer_mode", [(0, "bipartite"), (3, "protect"), (5, "bipartite")])
def test_each_layer_orders_by_energy_with_its_own_margin(layer, layer_mode):
    g = torch.Generator().manual_seed(layer)
    keys = torch.randn(2, 4, 4, generator=g).repeat_interleave(5, 1) + 0.7 * torch.randn(2, 20, 4, generator=g)
    keys = torch.cat([torch.randn(2, 1, 4, generator=g), keys], dim=1)
    x = torch.randn(2, 21, 6, generator=g)
    reducer = PiToMe(r=4, margin=0.8, layer_modes=[layer_mode] * 6)
    state = ReductionState.start(x, 1, [4] * 6, prop_attn=False, trace_source=True)
    state.begin_layer(21)
    reducer.reduce(x, Signals(keys=keys), state, layer, 4)
    orders = {m: energy_score(keys[:, 1:], m).argsort(dim=-1, descending=True, stable=True)
              for m in (0.8 * (1 - layer / 6), 0.8)}
    cands = 8 if layer_mode == "protect" else None
    want = ordered_bipartite_matching(keys, 4, 1, orders[0.8 * (1 - layer / 6)], num_candidates=cands)
    assert torch.equal(state.source, want.dest)
    if layer:  # the data is such that the margin matters
        other = ordered_bipartite_matching(keys, 4, 1, orders[0.8], num_candidates=cands)
        assert not torch.equal(other.dest, want.dest)


def text_layer_keys(seed, batch=2, num_prefix=1, tokens=16, dim=5):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, 4, dim, generator=g).repeat_interleave(tokens // 4, 1)
    keys = keys + 0.6 * torch.randn(batch, tokens, dim, generator=g)
    return torch.cat([torch.randn(batch, num_prefix, dim, generator=g), keys], dim=1)


def text_split_loop(keys, num_prefix, r, margin):
    """A = the r highest-energy tokens, B = the next r, protected = the rest (energy by loop, ties by
    position), and each A token's most similar B token; non-prefix indices, one sample at a time."""
    energy = energy_loop(keys[:, num_prefix:], margin, 1.0, "gaussian")
    splits = []
    for b in range(keys.shape[0]):
        order = sorted(range(keys.shape[1] - num_prefix), key=lambda i, b=b: (-energy[b, i].item(), i))
        a, bb, kept = order[:r], order[r : 2 * r], order[2 * r :]
        key = keys[b, num_prefix:]
        best = {i: max(bb, key=lambda j, i=i: cosine(key[i], key[j])) for i in a}
        splits.append((a, bb, kept, best))
    return splits


def run_text_layer(keys, x, num_prefix, r, layer, depth, sizes=None, margin=0.8):
    reducer = PiToMe(r=r, margin=margin, energy="gaussian", layer_modes=["text"] * depth, trace_source=True)
    state = ReductionState.start(x, num_prefix, [r] * depth, prop_attn=False, trace_source=True)
    state.sizes = sizes
    state.begin_layer(x.shape[1])
    out = reducer.reduce(x, Signals(keys=keys), state, layer, r)
    return out, state


@pytest.mark.parametrize("num_prefix, r, layer", [(1, 3, 0), (2, 5, 2), (0, 8, 3)])
def test_text_mode_merges_the_r_highest_energy_tokens_into_the_next_r(num_prefix, r, layer):
    keys = text_layer_keys(r, num_prefix=num_prefix)
    x = torch.randn(2, keys.shape[1], 6)
    _, state = run_text_layer(keys, x, num_prefix, r, layer, depth=4)
    splits = text_split_loop(keys, num_prefix, r, layer_margin(0.8, layer, 4))
    for b, (a, bb, kept, best) in enumerate(splits):
        slot = state.source[b].tolist()
        assert slot[:num_prefix] == list(range(num_prefix))
        # output order: prefix, protected (energy order), B (energy order); A tokens join their partner
        assert [slot[num_prefix + i] for i in kept + bb] == list(range(num_prefix, keys.shape[1] - r))
        assert all(slot[num_prefix + i] == slot[num_prefix + best[i]] for i in a)


@pytest.mark.parametrize("num_prefix, r", [(1, 4), (3, 6)])
def test_text_mode_merge_result_equals_a_brute_force_loop(num_prefix, r):
    keys = text_layer_keys(10 + r, num_prefix=num_prefix, tokens=20)
    g = torch.Generator().manual_seed(r)
    x = torch.randn(2, keys.shape[1], 6, generator=g)
    sizes = torch.randint(1, 5, (2, keys.shape[1], 1), generator=g).float()
    sizes[:, :num_prefix] = 1
    out, state = run_text_layer(keys, x, num_prefix, r, 1, depth=3, sizes=sizes)
    for b, (a, bb, kept, best) in enumerate(text_split_loop(keys, num_prefix, r, layer_margin(0.8, 1, 3))):
        want_x = [x[b, p] for p in range(num_prefix)] + [x[b, num_prefix + i] for i in kept]
        want_size = [1.0] * num_prefix + [sizes[b, num_prefix + i, 0].item() for i in kept]
        for j in bb:
            members = [num_prefix + j] + [num_prefix + i for i in a if best[i] == j]
            total = sum(sizes[b, m, 0].item() for m in members)
            want_x.append(sum(x[b, m] * sizes[b, m, 0].item() for m in members) / total)
            want_size.append(total)
        torch.testing.assert_close(out[b], torch.stack(want_x), rtol=1e-5, atol=1e-6)
        assert state.sizes[b, :, 0].tolist() == want_size
    assert out.shape[1] == keys.shape[1] - r


def test_text_variant_on_a_model_keeps_the_invariants_and_counts_its_macs():
    model = make_model("test_vit")
    depth, p = len(model.blocks), model.num_prefix_tokens
    reducer = PiToMe(ratio=0.7, energy="gaussian", layer_modes=["text"] * depth, trace_source=True)
    records = record_layers(reducer)
    tokenreduce.apply(model, reducer)
    x = images_for(model, batch=2)
    with torch.no_grad():
        text = model(x)
    total = model._tokenreduce.last_state.records[0].tokens_attn
    for entry in records:
        check_invariants(entry, p, total)
    stats = tokenreduce.stats(model)
    dim = model.blocks[0].attn.head_dim
    counts = zip(stats["tokens"], stats["removed"], strict=False)
    want = sum((t - p) ** 2 * dim + removed * removed * dim for t, removed in counts)
    assert stats["macs_parts"]["reducer"] == want
    tokenreduce.apply(model, "pitome", ratio=0.7, layer_modes=["protect"] * depth)
    with torch.no_grad():
        assert not torch.allclose(model(x), text)


def test_default_energy_is_elu_and_unchanged():
    assert PiToMe().params()["energy"] == "elu"
    model = make_model("test_vit")
    x = images_for(model)
    outputs = []
    for params in ({}, {"energy": "elu"}, {"energy": "gaussian"}):
        tokenreduce.apply(model, "pitome", ratio=0.6, **params)
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.allclose(outputs[0], outputs[2])


@pytest.mark.parametrize("ratio, fixture", [(0.9, KEEP_090), (0.925, KEEP_0925)])
@pytest.mark.parametrize("preset", ["deit", "mae"])
def test_token_counts_match_the_keep_ratio_fixtures(ratio, fixture, preset):
    model = tokenreduce.apply(narrow_vit_b_geometry(), "pitome", ratio=ratio, preset=preset)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert tokenreduce.stats(model)["tokens"] == [t + 1 for t in fixture]


def test_default_ratio_is_the_papers_0925():
    model = tokenreduce.apply(narrow_vit_b_geometry(), "pitome")
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert tokenreduce.stats(model)["tokens"] == [t + 1 for t in KEEP_0925]


@pytest.mark.parametrize("name", TINY_MODELS + ("deit_tiny_distilled_patch16_224",))
@pytest.mark.parametrize("mode", ["wavg", "mean"])
def test_invariants_and_merge_after_every_layer(name, mode):
    model = make_model(name)
    reducer = PiToMe(ratio=0.7, mode=mode, trace_source=True)
    records = record_layers(reducer)
    tokenreduce.apply(model, reducer)
    x = images_for(model, batch=2)
    with torch.no_grad():
        model(x)
    total = model._tokenreduce.last_state.records[0].tokens_attn
    assert [e["layer"] for e in records] == list(range(len(model.blocks)))
    for entry in records:
        check_invariants(entry, model.num_prefix_tokens, total)
        for b in range(2):
            for slot, members in enumerate(groups(entry, b)):
                w = entry["sizes_in"][b, members] if mode == "wavg" else torch.ones(len(members), 1)
                want = (entry["x_in"][b, members] * w).sum(0) / w.sum()
                torch.testing.assert_close(entry["x_out"][b, slot], want, rtol=1e-5, atol=1e-5)


def test_layer_modes_follow_the_preset_and_an_explicit_list():
    assert preset_layer_modes("deit", 12) == ["bipartite"] * 6 + ["protect"] * 6
    assert preset_layer_modes("deit", 5) == ["bipartite"] * 3 + ["protect"] * 2
    assert preset_layer_modes("mae", 5) == ["protect"] * 3 + ["bipartite"] * 2
    model = make_model("test_vit")
    depth = len(model.blocks)
    x = images_for(model)
    outputs = {}
    for label, params in {
        "deit": {}, "deit list": {"layer_modes": preset_layer_modes("deit", depth)},
        "mae": {"preset": "mae", "margin": 0.9}, "mae list": {"layer_modes": preset_layer_modes("mae", depth)},
        "protect": {"layer_modes": ["protect"] * depth}, "bipartite": {"layer_modes": ["bipartite"] * depth},
    }.items():
        tokenreduce.apply(model, "pitome", ratio=0.6, **params)
        with torch.no_grad():
            outputs[label] = model(x)
    torch.testing.assert_close(outputs["deit"], outputs["deit list"], rtol=0, atol=0)
    torch.testing.assert_close(outputs["mae"], outputs["mae list"], rtol=0, atol=0)
    assert not torch.allclose(outputs["protect"], outputs["bipartite"])
    assert not torch.allclose(outputs["deit"], outputs["mae"])


def test_margin_defaults_by_model_family():
    assert family_margin("deit_small_patch16_224") == 0.75
    assert family_margin("deit3_base_patch16_224") == 0.75
    assert family_margin("vit_small_patch16_224.augreg_in21k_ft_in1k") == 0.9
    assert family_margin("vit_base_patch16_224.mae") == 0.75
    assert family_margin("vit_base_patch16_224") == 0.9
    assert family_margin("vit_base_patch16_clip_224") == 0.9
    assert family_margin("vit_base_patch16_224", preset="mae") == 0.75
    deit = tokenreduce.apply(timm.create_model("deit_tiny_patch16_224", depth=2).eval(), "pitome")
    assert tokenreduce.reducer_of(deit).resolved_margin == 0.75
    model = make_model("test_vit")
    assert tokenreduce.reducer_of(tokenreduce.apply(model, "pitome")).resolved_margin == 0.9
    assert tokenreduce.reducer_of(tokenreduce.apply(model, "pitome", preset="mae")).resolved_margin == 0.75
    assert tokenreduce.reducer_of(tokenreduce.apply(deit, "pitome", margin=0.6)).resolved_margin == 0.6


def test_margin_alpha_mode_and_prop_attn_change_the_output():
    model = make_model("test_vit")
    x = images_for(model)
    outputs = {}
    for label, params in {"default": {}, "margin": {"margin": 0.2}, "alpha": {"alpha": 0.01},
                          "mean": {"mode": "mean"}, "prop_attn": {"prop_attn": True}}.items():
        tokenreduce.apply(model, "pitome", ratio=0.6, **params)
        with torch.no_grad():
            outputs[label] = model(x)
    assert tokenreduce.reducer_of(model).params()["prop_attn"] is True
    for label in ("margin", "alpha", "mean", "prop_attn"):
        assert not torch.allclose(outputs["default"], outputs[label]), label


@pytest.mark.parametrize("layer_mode", ["protect", "bipartite"])
def test_merging_duplicate_tokens_with_proportional_attention_changes_nothing(layer_mode):
    model = make_model("test_vit2")
    reducer = PiToMe(ratio=0.5, layer_modes=[layer_mode] * len(model.blocks), prop_attn=True)
    reduced, full = duplicate_pairs_through_two_blocks(model, reducer)
    torch.testing.assert_close(reduced, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["test_vit", "test_vit3"])
def test_analytic_macs_equal_flop_counter(name):
    """The energy's T x T similarities and the A x B matching scores are counted as reducer MACs."""
    model = tokenreduce.apply(make_model(name), "pitome", ratio=0.75)
    x = images_for(model, batch=2)
    flops = counted_flops(model, x)
    stats = tokenreduce.stats(model)
    assert stats["macs"] * 2 * 2 == flops
    dim = model.blocks[0].attn.head_dim
    p = model.num_prefix_tokens
    modes = preset_layer_modes("deit", len(model.blocks))
    want = 0
    for tokens, removed, mode in zip(stats["tokens"], stats["removed"], modes, strict=False):
        t = tokens - p
        cands = 2 * removed if mode == "protect" else t
        want += t * t * dim + (cands - cands // 2) * (cands // 2) * dim
    assert stats["macs_parts"]["reducer"] == want


@pytest.mark.parametrize("params, words", [
    ({"ratio": 0.0}, ["ratio=0.0", "(0, 1]"]),
    ({"ratio": 1.2}, ["ratio=1.2", "(0, 1]"]),
    ({"ratio": 0.4}, ["ratio=0.4", "[0.5, 1]", "protect"]),
    ({"ratio": None}, ["ratio=None", "r"]),
    ({"r": -1}, ["r=-1", ">= 0"]),
    ({"r": 4, "ratio": 0.9}, ["either", "r=4", "ratio=0.9"]),
    ({"layer_modes": ["protect", "merge"]}, ["layer_modes", "'bipartite'", "'protect'", "'text'"]),
    ({"layer_modes": "protect"}, ["layer_modes='protect'", "a list"]),
    ({"layer_modes": ["protect"] * 3}, ["3 entries", "blocks"]),
    ({"preset": "augreg"}, ["preset='augreg'", "deit, mae"]),
    ({"margin": 1.5}, ["margin=1.5", "[0.0, 1.0]"]),
    ({"alpha": -1}, ["alpha=-1", ">= 0"]),
    ({"energy": "cosine"}, ["energy='cosine'", "'elu'", "'gaussian'"]),
    ({"energy": "gaussian", "margin": 1.0}, ["margin=1.0", "energy='gaussian'", "sigma", "[0, 1)"]),
    ({"mode": "mlerp"}, ["mode='mlerp'", "'wavg'"]),
    ({"prop_attn": "no"}, ["prop_attn='no'"]),
    ({"ratios": 0.9}, ["unknown parameter", "ratios", "allowed"]),
])
def test_bad_input_fails_before_touching_the_model(params, words):
    model = make_model("test_vit")
    with pytest.raises(ConfigError) as err:
        tokenreduce.apply(model, "pitome", **params)
    for word in words:
        assert word in str(err.value)
    assert tokenreduce.reducer_of(model) is None


def test_params_record_the_schedule_that_is_used():
    assert PiToMe().params()["ratio"] == 0.925
    params = PiToMe(r=8).params()
    assert params["r"] == 8 and params["ratio"] is None
