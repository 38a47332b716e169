"""DiffRate: the fixed-schedule reducer (prune, then merge, per layer) against plain-loop references,
and the differentiable rate search (its proxy, its cost, reproducibility and resuming)."""

import io
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import counted_flops, images_for, make_model

import tokenreduce
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import Signals, create_reducer
from tokenreduce.reducers.diffrate import split_counts
from tokenreduce.search.diffrate import (
    CostModel,
    candidates,
    diffrate_search,
    expected_kept,
    keep_probability,
    layer_counts,
    masked_forward,
)


def run(model, x):
    with torch.no_grad():
        return model(x)


# --- the fixed reducer -------------------------------------------------------------------------
def reference_layer(x, importance, keys, prefix, pruned, merged):
    """One layer by plain loops: rank by importance (ties: earlier first), drop the last `pruned`,
    merge the `merged` before them into their most similar (cosine) more important token."""
    outs, sizes = [], []
    for b in range(x.shape[0]):
        tokens = x.shape[1] - prefix
        ranked = sorted(range(tokens), key=lambda j: (-float(importance[b, j]), j))
        kept = tokens - pruned - merged
        dests, sources = sorted(ranked[:kept]), ranked[kept : kept + merged]
        members = {d: [d] for d in dests}
        for s in sources:
            sims = [F.cosine_similarity(keys[b, s], keys[b, d], dim=0).item() for d in dests]
            members[dests[max(range(len(dests)), key=lambda i: (sims[i], -i))]].append(s)
        rows = [x[b, p] for p in range(prefix)]
        rows += [torch.stack([x[b, prefix + j] for j in members[d]]).mean(0) for d in dests]
        outs.append(torch.stack(rows))
        sizes.append([1.0] * prefix + [float(len(members[d])) for d in dests])
    return torch.stack(outs), torch.tensor(sizes).unsqueeze(-1)


@pytest.mark.parametrize("pruned, merged", [(3, 4), (0, 5), (6, 0), (2, 7)])
def test_one_layer_prunes_then_merges_as_the_plain_loop(pruned, merged):
    g = torch.Generator().manual_seed(pruned * 10 + merged)
    batch, prefix, tokens, dim, key_dim = 3, 2, 18, 8, 5
    x = torch.randn(batch, prefix + tokens, dim, generator=g)
    keys = torch.randn(batch, prefix + tokens, key_dim, generator=g)
    attn = torch.rand(batch, 2, prefix + tokens, prefix + tokens, generator=g)
    importance = attn[:, :, 0, prefix:].mean(1)
    reducer = create_reducer("diffrate", prune=[0, pruned], merge=[0, merged])
    state = ReductionState.start(x, prefix, [0, pruned + merged], prop_attn=True, trace_source=True)
    state.begin_layer(x.shape[1])
    out = reducer.reduce(x, Signals(keys=keys, attn=attn), state, 1, pruned + merged)
    want, want_sizes = reference_layer(x, importance, keys[:, prefix:], prefix, pruned, merged)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(state.sizes, want_sizes) if merged else state.sizes.eq(1).all()
    assert state.records[-1].reducer_macs == merged * (tokens - pruned - merged) * key_dim
    assert torch.equal(state.source[:, :prefix], torch.arange(prefix).expand(batch, -1))
    assert int((state.source == out.shape[1]).sum()) == batch * pruned  # exactly the pruned are dropped


def walk(prune, merge, tokens, depth):
    """Expected per-layer removals by a plain loop over the caps."""
    removed = []
    for layer in range(depth):
        p = prune if isinstance(prune, int) else (prune[layer] if layer < len(prune) else 0)
        m = merge if isinstance(merge, int) else (merge[layer] if layer < len(merge) else 0)
        p = min(p, tokens - 1)
        m = min(m, (tokens - p) // 2)
        removed.append(p + m)
        tokens -= p + m
    return removed


@pytest.mark.parametrize("prune, merge", [([0, 5, 3, 40], [0, 10, 20, 10, 5]), (4, 6), ([0, 200], 3),
                                          ([0, 0, 0, 0, 0, 99], [0, 60])])
def test_realised_counts_per_layer(prune, merge):
    model = tokenreduce.apply(make_model("test_vit"), "diffrate", prune=prune, merge=merge)
    run(model, images_for(model))
    stats = tokenreduce.stats(model)
    want = walk(prune, merge, 100, 6)
    assert stats["removed"] == want
    assert stats["tokens"][-1] == 101 - sum(want)
    assert model.token_reducer.removal_counts(6, 100) == want


@pytest.mark.parametrize("params", [{"prune": 0, "merge": 0}, {"prune": [0, 0, 0], "merge": [0]}])
def test_removing_nothing_is_the_unpatched_model(params):
    model = make_model("test_vit")
    x = images_for(model)
    want = run(model, x)
    got = run(tokenreduce.apply(model, "diffrate", **params), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_pruning_alone_is_top_k():
    model = make_model("test_vit")
    x = images_for(model, batch=3)
    topk = run(tokenreduce.apply(model, "topk", ratio=0.7, layers=[1, 3]), x)
    got = run(tokenreduce.apply(model, "diffrate", prune=[0, 30, 0, 21], merge=0, prop_attn=False), x)
    torch.testing.assert_close(got, topk, rtol=1e-5, atol=1e-5)


def test_batch_independence():
    model = tokenreduce.apply(make_model("test_vit"), "diffrate", prune=[0, 9, 5], merge=[0, 12, 8, 4])
    x = images_for(model, batch=4)
    together = run(model, x)
    alone = torch.cat([run(model, x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_prefix_tokens_are_never_removed():
    model = make_model("test_vit", reg_tokens=2)  # class token + 2 registers
    tokenreduce.apply(model, "diffrate", prune=[0, 60, 30], merge=[0, 20, 5, 3], trace_source=True)
    run(model, images_for(model, batch=2))
    stats = tokenreduce.stats(model)
    assert torch.equal(stats["source"][:, :3], torch.arange(3).expand(2, -1))
    patches = stats["source"][:, 3:]
    assert ((patches == -1) | (patches >= 3)).all()  # no patch ends in a prefix token (-1: pruned)
    assert (patches == -1).any() and (patches >= 3).any()


@pytest.mark.parametrize("params, match", [
    ({"prune": -1}, "diffrate: prune=-1 is invalid; allowed: an integer >= 0"),
    ({"merge": "abc"}, "diffrate: merge='abc' is invalid"),
    ({"prune": [1, -2]}, r"diffrate: prune=\[1, -2\] is invalid; allowed: a list of integers >= 0"),
    ({"merge": True}, "diffrate: merge=True is invalid"),
    ({"merge": 1.5}, "diffrate: merge=1.5 is invalid"),
    ({"prune_rate": 1}, "diffrate: unknown parameter"),
    ({"prop_attn": 1}, "diffrate: prop_attn=1 is invalid"),
])
def test_bad_parameters_are_refused(params, match):
    with pytest.raises(ConfigError, match=match):
        tokenreduce.apply(make_model("test_vit"), "diffrate", **params)


def test_bad_models_are_refused():
    with pytest.raises(ConfigError, match="diffrate: merge has 7 entries but the model has 6 blocks"):
        tokenreduce.apply(make_model("test_vit"), "diffrate", prune=0, merge=[1] * 7)
    model = make_model("test_vit2")  # registers, no class token
    with pytest.raises(ConfigError, match="class token"):
        tokenreduce.apply(model, "diffrate", prune=[0, 3])


# --- the search: proxy and cost ----------------------------------------------------------------
def test_keep_probability_is_the_summed_probability_of_candidates_keeping_the_rank():
    g = torch.Generator().manual_seed(0)
    for tokens, granularity in ((12, 1), (20, 3)):
        kept = candidates(tokens, granularity)
        assert kept.tolist() == list(range(tokens, 0, -granularity))
        probs = torch.rand(len(kept), generator=g).softmax(0)
        want = [sum(float(p) for p, c in zip(probs, kept.tolist(), strict=True) if c >= j + 1) for j in range(tokens)]
        torch.testing.assert_close(keep_probability(probs, kept, tokens), torch.tensor(want))
        logits = torch.randn(len(kept), generator=g)
        assert float(expected_kept(logits, kept)) == math.ceil(float((logits.softmax(0) * kept).sum()))


def test_expected_fraction_falls_as_the_logits_favour_fewer_tokens():
    model = make_model("test_vit")
    cost, kept = CostModel(model), candidates(100, 1)
    fractions = []
    for alpha in (-20.0, -5.0, 0.0, 5.0, 20.0):
        logits = (alpha * (1 - kept / 100)).expand(5, -1).clone().requires_grad_(True)
        counts = layer_counts(expected_kept(logits, kept), expected_kept(logits, kept), 100)
        fraction = cost.macs([(torch.tensor(100.0),) * 3] + counts) / cost.baseline
        fraction.backward()
        assert logits.grad.abs().sum() > 0  # the rounding passes the gradient straight through
        fractions.append(fraction.item())
    assert all(a > b for a, b in zip(fractions, fractions[1:], strict=False))
    assert fractions[0] > 0.95 and fractions[-1] < 0.5


def test_cost_model_equals_the_reducer_macs():
    model = make_model("test_vit")
    cost, rng = CostModel(model), random.Random(0)
    assert cost.baseline == tokenreduce.reducer_macs(model, "none")
    for _ in range(5):
        prune, merge = [rng.randint(0, 40) for _ in range(6)], [rng.randint(0, 40) for _ in range(6)]
        measured = tokenreduce.reducer_macs(model, "diffrate", prune=prune, merge=merge) / cost.baseline
        assert cost.fraction(prune, merge) == pytest.approx(measured, abs=1e-12)
    assert split_counts(200, 7, 50) == (49, 0) and split_counts(3, 30, 50) == (3, 23)


def test_unmasked_forward_is_the_model():
    model = make_model("test_vit")
    x = images_for(model)
    torch.testing.assert_close(masked_forward(model, x, None, None, candidates(100, 1)), run(model, x),
                               rtol=1e-4, atol=1e-4)


# --- the search: runs ----------------------------------------------------------------------------
def calibration(model, count=6):
    x = images_for(model, batch=count, seed=1)
    labels = torch.randint(0, model.num_classes, (count,), generator=torch.Generator().manual_seed(2))
    return x, labels


SEARCH = {"steps": 3, "batch_size": 3, "lr": 0.05, "granularity": 4}


def test_search_fits_the_target_is_reproducible_and_leaves_the_model_as_it_came():
    model = make_model("test_vit")
    model.blocks[0].mlp.fc1.weight.requires_grad_(False)
    tokenreduce.apply(model, "tome", r=2)
    reducer = tokenreduce.reducer_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x, labels = calibration(model)
    first = diffrate_search(model, x, None, 0.6, **SEARCH)
    second = diffrate_search(model, x, None, 0.6, **SEARCH)
    assert first == second
    assert first["mac_fraction"] <= 0.6 and len(first["history"]) == 3
    assert first["prune"][0] == first["merge"][0] == 0 and len(first["prune"]) == 6
    measured = tokenreduce.reducer_macs(model, "diffrate", prune=first["prune"], merge=first["merge"])
    assert first["mac_fraction"] == measured / tokenreduce.reducer_macs(model, "none")
    labelled = diffrate_search(model, x, labels, 0.6, **SEARCH)
    assert labelled["mac_fraction"] <= 0.6 and labelled["history"] != first["history"]
    assert tokenreduce.reducer_of(model) is reducer and not model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_an_interrupted_search_resumes_to_the_same_result():
    model = make_model("test_vit")
    x, labels = calibration(model)
    settings = {**SEARCH, "steps": 4}
    whole = diffrate_search(model, x, labels, 0.5, **settings)
    saved = {}

    def stop_at_two(state):
        if state["step"] == 2:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            saved["state"] = buffer.getvalue()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        diffrate_search(model, x, labels, 0.5, **settings, on_step=stop_at_two)
    state = torch.load(io.BytesIO(saved["state"]))
    resumed = diffrate_search(model, x, labels, 0.5, **settings, state=state)
    assert resumed == whole
    with pytest.raises(ConfigError, match="other settings \\(target\\)"):
        diffrate_search(model, x, labels, 0.4, **settings, state=state)


def test_search_refuses_what_it_cannot_run():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="model class Linear is not supported"):
        diffrate_search(torch.nn.Linear(2, 2), x, None, 0.5)
    model = make_model("test_vit2")
    with pytest.raises(ConfigError, match="class token"):
        diffrate_search(model, images_for(model), None, 0.5)
    model = make_model("test_vit")
    for bad, match in (({"target": 1.5}, "target=1.5"), ({"granularity": 0}, "granularity=0"),
                       ({"steps": -1}, "steps=-1")):
        with pytest.raises(ConfigError, match=match):
            diffrate_search(model, images_for(model), None, **{"target": 0.5, **bad})


def test_pruning_and_merging_macs_equal_flop_counter_and_gradients_flow():
    """The invariants' MAC and gradient checks with both parts acting (tests/test_invariants.py runs
    them, and the merge checks, on a merging-only setting)."""
    model = tokenreduce.apply(make_model("test_vit", drop_path_rate=0.1), "diffrate", prune=[0, 10, 0, 8],
                              merge=[0, 8, 6, 4])
    x = images_for(model, batch=2)
    flops = counted_flops(model, x)
    assert tokenreduce.stats(model)["macs"] * 2 * 2 == flops
    model.train()
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters())
