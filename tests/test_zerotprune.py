"""Zero-TPrune: each stage against a plain-loop reference (weighted PageRank, head filter and
root-mean-square aggregation, similarity-based selection in both partitions, the importance-only
share), then the reducer in a model: exact removal counts, prefix tokens never pruned, the
dropped tokens those the reference picks from the block's own attention and keys, r=0, batch
independence, and parameters refused before any compute."""

import math

import pytest
import torch
from conftest import images_for, make_model
from reduction_checks import record_layers

import tokenreduce
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError
from tokenreduce.reducers import zerotprune as zt
from tokenreduce.reducers.base import Signals


# --- plain-loop references ---------------------------------------------------------------------
def ref_wpr(attn: list[list[float]], iterations: int) -> list[float]:
    """s_{t+1}[i] = sum_j attn[j][i] * s_t[j], from s_0 = 1/N."""
    n = len(attn)
    s = [1.0 / n] * n
    for _ in range(iterations):
        new = [0.0] * n
        for i in range(n):
            for j in range(n):
                new[i] += attn[j][i] * s[j]
        s = new
    return s


def ref_importance(scores: list[list[float]], head_variance) -> list[float]:
    """One image's heads' scores [H][N] -> [N]: RMS over the heads whose N * s has a population
    variance in head_variance (every head when none is, or when head_variance is None)."""
    n = len(scores[0])
    kept = []
    for s in scores:
        scaled = [n * v for v in s]
        mean = sum(scaled) / n
        variance = sum((v - mean) ** 2 for v in scaled) / n
        if head_variance is None or head_variance[0] <= variance <= head_variance[1]:
            kept.append(s)
    if not kept:
        kept = scores
    return [math.sqrt(sum(s[i] ** 2 for s in kept) / len(kept)) for i in range(n)]


def cosine(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def ref_dropped(importance: list[float], metric: list[list[float]], removal: int, share: float,
                partition: str) -> set[int]:
    """The tokens one image drops: the floor(share * removal) least important, then among the rest,
    split along the importance ranking, the A tokens with the highest best similarity to B."""
    ranked = sorted(range(len(importance)), key=lambda i: -importance[i])  # stable: ties by position
    by_importance = math.floor(round(share * removal, 9))
    remaining = ranked[: len(ranked) - by_importance]
    dropped = set(ranked[len(ranked) - by_importance :])
    if partition == "sequential":
        num_b = len(remaining) - len(remaining) // 2
        group_b, group_a = remaining[:num_b], remaining[num_b:]
    else:
        group_b = [t for rank, t in enumerate(remaining) if rank % 2 == 0]
        group_a = [t for rank, t in enumerate(remaining) if rank % 2 == 1]
    best = {a: max(cosine(metric[a], metric[b]) for b in group_b) for a in group_a}
    by_similarity = sorted(group_a, key=lambda a: -best[a])[: removal - by_importance]
    return dropped | set(by_similarity)


def ref_layer_dropped(attn: torch.Tensor, keys: torch.Tensor, num_prefix: int, removal: int, iterations: int,
                      head_variance, share: float, partition: str) -> list[set[int]]:
    """Per image, the non-prefix positions (0 = first non-prefix) one reducing layer drops."""
    out = []
    for b in range(attn.shape[0]):
        scores = [ref_wpr(attn[b, h].double().tolist(), iterations) for h in range(attn.shape[1])]
        importance = ref_importance(scores, head_variance)[num_prefix:]
        out.append(ref_dropped(importance, keys[b, num_prefix:].double().tolist(), removal, share, partition))
    return out


def random_attention(batch: int, heads: int, n: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n, n, generator=g) * sharpness).softmax(dim=-1)


def dropped_of(keep: torch.Tensor) -> list[set[int]]:
    return [set((~row).nonzero().flatten().tolist()) for row in keep]


# --- the stages ----------------------------------------------------------------------------------
def test_wpr_of_a_three_token_graph_by_hand():
    attn = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    # s1 = column sums / 3; s2_i = sum_j A[j, i] s1_j
    want = {0: [1 / 3, 1 / 3, 1 / 3], 1: [1 / 3, 5 / 12, 1 / 4], 2: [3 / 8, 5 / 12, 5 / 24]}
    for iterations, scores in want.items():
        got = zt.wpr_scores(attn[None, None], iterations)[0, 0]
        torch.testing.assert_close(got, torch.tensor(scores), rtol=0, atol=1e-7)
        assert ref_wpr(attn.tolist(), iterations) == pytest.approx(scores, abs=1e-12)


@pytest.mark.parametrize("iterations", [1, 5, 30])
def test_wpr_equals_the_loop_and_keeps_the_total(iterations):
    attn = random_attention(2, 3, 12, seed=1)
    got = zt.wpr_scores(attn, iterations)
    for b in range(2):
        for h in range(3):
            want = ref_wpr(attn[b, h].double().tolist(), iterations)
            torch.testing.assert_close(got[b, h].double(), torch.tensor(want, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3))


def test_iteration_counts_by_layer():
    assert [zt.layer_iterations((30, 5, 1), layer, 12) for layer in range(12)] == [30] * 3 + [5] * 6 + [1] * 3
    assert [zt.layer_iterations((7, 4, 2), layer, 9) for layer in range(9)] == [7] * 3 + [4] * 3 + [2] * 3
    # fewer than six blocks: the first three keep their count
    assert [zt.layer_iterations((7, 4, 2), layer, 4) for layer in range(4)] == [7, 7, 7, 2]


@pytest.mark.parametrize("head_variance", [None, (0.01, 0.7), (0.0, 0.5), (0.5, 3.0), (50.0, 60.0)])
def test_head_filter_and_rms_aggregation_equal_the_loop(head_variance):
    # heads from nearly flat to sharp, so some variances fall inside each range and some outside
    sharp = torch.tensor([0.05, 0.5, 1.5, 4.0])
    g = torch.Generator().manual_seed(2)
    attn = (torch.randn(3, 4, 16, 16, generator=g) * sharp[:, None, None]).softmax(-1)
    scores = zt.wpr_scores(attn, 2)
    got = zt.head_importance(scores, head_variance)
    kept = zt.kept_heads(scores, head_variance)
    for b in range(3):
        rows = scores[b].double().tolist()
        want = ref_importance(rows, head_variance)
        want = torch.tensor(want, dtype=torch.float64)
        torch.testing.assert_close(got[b].double(), want, rtol=1e-5, atol=1e-8)
        n = len(rows[0])
        variances = [sum((n * v - 1) ** 2 for v in s) / n for s in rows]
        in_range = [head_variance is None or head_variance[0] <= v <= head_variance[1] for v in variances]
        assert kept[b].tolist() == (in_range if any(in_range) else [True] * 4)
    if head_variance == (0.01, 0.7):  # the paper's range leaves the flattest head out here
        assert not kept[:, 0].any() and kept.any(dim=1).all()
    if head_variance == (50.0, 60.0):  # no head in range: every head counts
        assert kept.all()


def test_head_filter_matters():
    sharp = torch.tensor([0.05, 4.0])
    g = torch.Generator().manual_seed(3)
    attn = (torch.randn(1, 2, 10, 10, generator=g) * sharp[:, None, None]).softmax(-1)
    scores = zt.wpr_scores(attn, 1)
    variances = (scores * 10).var(-1, correction=0)[0]
    narrow = (0.0, float(variances.min()) * 1.01)  # only the flat head
    torch.testing.assert_close(zt.head_importance(scores, narrow), scores[:, 0])
    all_heads = zt.head_importance(scores, None)
    torch.testing.assert_close(all_heads, scores.square().mean(1).sqrt())


@pytest.mark.parametrize("partition", ["sequential", "alternate"])
@pytest.mark.parametrize("tokens, removal", [(20, 7), (21, 10), (15, 1), (16, 8)])
def test_s_stage_selection_equals_the_loop(partition, tokens, removal):
    g = torch.Generator().manual_seed(tokens * 31 + removal)
    importance = torch.rand(3, tokens, generator=g)
    metric = torch.randn(3, tokens, 8, generator=g)
    keep = zt.select_kept(importance, metric, removal, 0.0, partition)
    assert (keep.sum(1) == tokens - removal).all()
    want = [ref_dropped(importance[b].double().tolist(), metric[b].double().tolist(), removal, 0.0, partition)
            for b in range(3)]
    assert dropped_of(keep) == want


def test_partitions_by_hand():
    # importance ranks tokens 3 > 1 > 0 > 2
    importance = torch.tensor([[0.3, 0.4, 0.1, 0.9]])
    metric = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.1, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    # sequential: B = {3, 1}, A = {0, 2}; token 2's best (to 1: 0.995) beats token 0's (to 3: 0.894)
    assert dropped_of(zt.select_kept(importance, metric, 1, partition="sequential")) == [{2}]
    # alternate: B = ranks 0, 2 = {3, 0}, A = ranks 1, 3 = {1, 2};
    # token 2 (to 0: 0.534) beats token 1 (to 0: 0.447)
    assert dropped_of(zt.select_kept(importance, metric, 1, partition="alternate")) == [{2}]
    metric[0, 2] = torch.tensor([0.0, 0.0, 1.0])  # now orthogonal to every other token
    assert dropped_of(zt.select_kept(importance, metric, 1, partition="sequential")) == [{0}]
    assert dropped_of(zt.select_kept(importance, metric, 1, partition="alternate")) == [{1}]
    assert dropped_of(zt.select_kept(importance, metric, 2, partition="alternate")) == [{1, 2}]


@pytest.mark.parametrize("partition", ["sequential", "alternate"])
@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_importance_share_equals_the_loop(partition, share):
    g = torch.Generator().manual_seed(11)
    importance = torch.rand(2, 30, generator=g)
    metric = torch.randn(2, 30, 6, generator=g)
    removal = 10
    keep = zt.select_kept(importance, metric, removal, share, partition)
    assert (keep.sum(1) == 30 - removal).all()
    want = [ref_dropped(importance[b].tolist(), metric[b].double().tolist(), removal, share, partition)
            for b in range(2)]
    assert dropped_of(keep) == want
    by_importance = math.floor(round(share * removal, 9))
    lowest = importance.argsort(dim=1)[:, :by_importance]
    assert all(set(row.tolist()) <= dropped for row, dropped in zip(lowest, dropped_of(keep), strict=True))
    if share == 1.0:  # pure I-stage: the r least important go
        assert dropped_of(keep) == [set(row.tolist()) for row in importance.argsort(dim=1)[:, :removal]]


def test_importance_count_rounds_down():
    shares = (0.0, 0.05, 0.29, 0.3, 0.7, 0.99, 1.0)
    assert [zt.importance_count(10, s) for s in shares] == [0, 0, 2, 3, 7, 9, 10]
    assert zt.importance_count(100, 0.29) == 29  # 0.29 * 100 is 28.999999999999996 in floats


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("partition", ["sequential", "alternate"])
def test_reduce_drops_the_reference_tokens_and_counts_its_macs(partition, share):
    """One reducing layer called directly: the output is the input without the tokens the loop
    reference picks, in order, prefix tokens first; the MACs are the WPR's and the similarity's."""
    batch, heads, num_prefix, tokens, dim = 2, 3, 2, 24, 5
    n = num_prefix + tokens
    g = torch.Generator().manual_seed(5)
    attn = random_attention(batch, heads, n, seed=6)
    keys = torch.randn(batch, n, dim, generator=g)
    x = torch.randn(batch, n, 7, generator=g)
    reducer = tokenreduce.create_reducer("zerotprune", r=9, iterations=(4, 3, 2), partition=partition,
                                         importance_share=share)
    for layer, iterations in ((1, 4), (5, 3), (10, 2)):
        state = ReductionState(num_prefix=num_prefix, removals=[0] * 12)
        state.begin_layer(n)
        out = reducer.reduce(x, Signals(keys=keys, attn=attn), state, layer, 9)
        want = ref_layer_dropped(attn, keys, num_prefix, 9, iterations, (0.01, 0.7), share, partition)
        for b in range(batch):
            kept = list(range(num_prefix)) + [num_prefix + t for t in range(tokens) if t not in want[b]]
            assert len(kept) == n - 9
            torch.testing.assert_close(out[b], x[b, kept], rtol=0, atol=0)
        remaining = tokens - math.floor(round(share * 9, 9))
        similarity = (remaining // 2) * (remaining - remaining // 2) * dim if share < 1 else 0
        assert state.records[-1].reducer_macs == iterations * heads * n * n + similarity


# --- in a model ----------------------------------------------------------------------------------
def run_reduced(model_name: str, x, **params):
    model = tokenreduce.apply(make_model(model_name), "zerotprune", **params)
    with torch.no_grad():
        out = model(x)
    return out, model


@pytest.mark.parametrize("model_name", ["test_vit", "test_vit2"])
def test_exact_removal_counts_per_layer(model_name):
    x = images_for(make_model(model_name))
    r = [10, 0, 60, 5, 3, 30]  # 60 and the last 30 exceed half of the tokens entering: capped at half
    _, model = run_reduced(model_name, x, r=r)
    stats = tokenreduce.stats(model)
    depth = len(model.blocks)
    want, tokens = [], 100
    for layer in range(depth):
        removal = min(r[layer] if layer < len(r) else 0, tokens // 2)
        want.append(removal)
        tokens -= removal
    assert stats["removed"] == want == [10, 0, 45, 5, 3, 18] + [0] * (depth - 6)
    assert stats["tokens"][-1] == 1 + 100 - sum(want)
    _, model = run_reduced(model_name, x, r=7, layers=[1, 4])
    assert tokenreduce.stats(model)["removed"] == [0, 7, 0, 0, 7] + [0] * (depth - 5)


@pytest.mark.parametrize("partition, share", [("sequential", 0.0), ("alternate", 0.4)])
@pytest.mark.parametrize("model_name", ["test_vit", "test_vit3"])
def test_the_model_drops_what_the_reference_picks_from_its_attention_and_keys(model_name, partition, share):
    """Every reducing layer of a real pass: the surviving input tokens are the ones the S-stage loop
    reference picks from the block's own attention probabilities (through the WPR and aggregation
    at the layer's iteration count) and head-averaged keys; prefix tokens stay first, unchanged;
    kept tokens keep their order.

    On these random models attention is nearly uniform, so importance scores differ in their
    seventh digit: the importance is taken from the vectorised stages (checked against loops
    above on well-separated inputs), as a float64 loop would rank near-ties otherwise."""
    model = make_model(model_name)
    x = images_for(model)
    model = tokenreduce.apply(model, "zerotprune", r=12, iterations=(3, 2, 1), partition=partition,
                              importance_share=share, trace_source=True)
    seen = {"attn": [], "keys": []}
    for blk in model.blocks:
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: seen["attn"].append(i[0]))
        blk.attn.k_norm.register_forward_hook(lambda m, i, o: seen["keys"].append(o.mean(dim=1)))
    records = record_layers(tokenreduce.reducer_of(model))
    with torch.no_grad():
        model(x)
    depth = len(model.blocks)
    assert [entry["layer"] for entry in records] == list(range(depth))
    for entry in records:
        layer, n = entry["layer"], entry["x_in"].shape[1]
        removal = min(12, (n - 1) // 2)
        attn, keys = seen["attn"][layer], seen["keys"][layer]
        assert attn.shape[-1] == n
        iterations = zt.layer_iterations((3, 2, 1), layer, depth)
        importance = zt.head_importance(zt.wpr_scores(attn, iterations), (0.01, 0.7))[:, 1:]
        want = [ref_dropped(importance[b].tolist(), keys[b, 1:].double().tolist(), removal, share, partition)
                for b in range(x.shape[0])]
        for b in range(x.shape[0]):
            kept = [0] + [1 + t for t in range(n - 1) if t not in want[b]]
            torch.testing.assert_close(entry["x_out"][b], entry["x_in"][b, kept], rtol=0, atol=0)
            # the source map: the kept tokens take the first slots in order, the dropped ones none
            slot = {}
            pairs = zip(entry["source_in"][b].tolist(), entry["source_out"][b].tolist(), strict=True)
            for before, after in pairs:
                if before < n:
                    slot[before] = after
            assert [slot[t] for t in kept] == list(range(n - removal))
            assert all(slot[t] == n - removal for t in range(n) if t not in kept)


@pytest.mark.parametrize("model_name", ["test_vit", "test_vit2", "test_vit4"])
def test_prefix_tokens_are_never_pruned(model_name):
    """Even when they would rank lowest: the prefix stays first, unchanged, and is never a candidate."""
    model = tokenreduce.apply(make_model(model_name), "zerotprune", r=20, importance_share=1.0,
                              trace_source=True)
    records = record_layers(tokenreduce.reducer_of(model))
    x = images_for(model, batch=3)
    with torch.no_grad():
        model(x)
    num_prefix = model.num_prefix_tokens
    for entry in records:
        assert torch.equal(entry["x_out"][:, :num_prefix], entry["x_in"][:, :num_prefix])
    state = model._tokenreduce.last_state
    assert torch.equal(state.source[:, :num_prefix], torch.arange(num_prefix).expand(3, -1))


def test_works_without_a_class_token():
    model = make_model("test_vit2")  # a register token, average pooling, no class token
    x = images_for(model)
    out, model = run_reduced("test_vit2", x, r=9)
    assert out.isfinite().all() and sum(tokenreduce.stats(model)["removed"]) > 0


@pytest.mark.parametrize("model_name", ["test_vit", "test_vit2"])
def test_r_zero_is_the_unpatched_model(model_name):
    model = make_model(model_name)
    x = images_for(model)
    with torch.no_grad():
        want = model(x)
    for params in ({"r": 0}, {"r": [0, 0, 0]}, {"r": 5, "layers": []}):
        got, reduced = run_reduced(model_name, x, **params)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert tokenreduce.stats(reduced)["removed"] == [0] * len(reduced.blocks)


def test_each_image_is_reduced_on_its_own():
    x = images_for(make_model("test_vit"), batch=4)
    model = tokenreduce.apply(make_model("test_vit"), "zerotprune", r=12)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("partition, share", [("sequential", 0.0), ("alternate", 0.5), ("alternate", 1.0)])
def test_a_reducing_layer_reads_no_other_image(partition, share):
    """The same signals, image by image or together, give the same tokens (in the model, a batch's
    attention differs from a single image's in the last bits, and near-tied importance scores of a
    random model may then rank apart; here the signals are the same)."""
    batch, n = 4, 30
    g = torch.Generator().manual_seed(8)
    attn = random_attention(batch, 2, n, seed=9)
    keys, x = torch.randn(batch, n, 6, generator=g), torch.randn(batch, n, 5, generator=g)
    reducer = tokenreduce.create_reducer("zerotprune", r=10, partition=partition, importance_share=share)

    def reduce(i):
        state = ReductionState(num_prefix=1, removals=[10] * 6)
        state.begin_layer(n)
        return reducer.reduce(x[i], Signals(keys=keys[i], attn=attn[i]), state, 2, 10)

    alone = torch.cat([reduce(slice(i, i + 1)) for i in range(batch)])
    assert torch.equal(reduce(slice(None)), alone)


def test_the_iteration_count_follows_the_layer(monkeypatch):
    used = []
    original = zt.wpr_scores

    def counting(attn, iterations):
        used.append(iterations)
        return original(attn, iterations)

    monkeypatch.setattr(zt, "wpr_scores", counting)
    _, model = run_reduced("test_vit3", images_for(make_model("test_vit3")), r=4, iterations=[9, 4, 2])
    assert used == [9, 9, 9, 4, 4, 4, 2, 2, 2]


@pytest.mark.parametrize("params, message", [
    ({"r": -1}, "zerotprune: r=-1 is invalid"),
    ({"r": 2.5}, "zerotprune: r=2.5 is invalid"),
    ({"layers": [1, -2]}, r"zerotprune: layers=\[1, -2\] is invalid"),
    ({"iterations": (30, 5)}, r"zerotprune: iterations=\(30, 5\) is invalid; allowed: three integers >= 1"),
    ({"iterations": (30, 0, 1)}, r"zerotprune: iterations=\(30, 0, 1\) is invalid"),
    ({"iterations": (30, 5.5, 1)}, r"zerotprune: iterations=\(30, 5.5, 1\) is invalid"),
    ({"iterations": 30}, "zerotprune: iterations=30 is invalid"),
    ({"head_variance": (0.7, 0.01)}, r"head_variance=\(0.7, 0.01\) is invalid; allowed: \(low, high\)"),
    ({"head_variance": (-0.1, 0.7)}, r"zerotprune: head_variance=\(-0.1, 0.7\) is invalid"),
    ({"head_variance": 0.5}, "zerotprune: head_variance=0.5 is invalid"),
    ({"head_variance": (0.01, float("nan"))}, "zerotprune: head_variance=.* is invalid"),
    ({"partition": "random"}, "partition='random' is invalid; allowed: 'sequential', 'alternate'"),
    ({"importance_share": 1.5}, r"importance_share=1.5 is invalid; allowed: a number in \[0, 1\]"),
    ({"importance_share": -0.1}, "zerotprune: importance_share=-0.1 is invalid"),
    ({"importance_share": "half"}, "zerotprune: importance_share='half' is invalid"),
    ({"prop_attn": 1}, "zerotprune: prop_attn=1 is invalid; allowed: true or false"),
    ({"trace_source": "yes"}, "zerotprune: trace_source='yes' is invalid"),
    ({"layers": [3, 40]}, r"zerotprune: layers=\[3, 40\] reaches beyond the model's 6 blocks"),
    ({"r": [1] * 7}, "zerotprune: r has 7 entries but the model has 6 blocks"),
])
def test_bad_settings_are_refused_before_any_compute(params, message, monkeypatch):
    monkeypatch.setattr(zt, "wpr_scores", lambda *a: pytest.fail("computed before refusing"))
    model = make_model("test_vit")
    with pytest.raises(ConfigError, match=message):
        tokenreduce.apply(model, "zerotprune", **params)
    assert not hasattr(model, "_tokenreduce")
