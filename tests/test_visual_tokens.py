"""The VLM selection rules of `tokenreduce.core.visual_tokens`, each against a plain-loop reference
written from the rule (Python loops over samples and tokens), hand-computed fixtures, invariants and
refusals."""

import math

import pytest
import torch

from tokenreduce.core.visual_tokens import (
    attention_relevance,
    attention_scores,
    dart_keep,
    dart_keep_count,
    density_peak_clusters,
    fastv_keep,
    fastv_keep_count,
    iqr_outlier_count,
    prumerge,
    pyramid_schedule,
    select_raters,
    sequence_keep,
    sparsevlm_keep,
    sparsevlm_keep_count,
    sparsevlm_recycle_counts,
    text_relevance,
    top_k_in_order,
    visionzip,
)
from tokenreduce.errors import ConfigError

SEEDS = [0, 1, 2, 3]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ plain references


def ref_top_k(scores, k, candidates=None):
    """One row: the k best (score high, then index low) of the candidates, ascending."""
    n = len(scores)
    pool = [j for j in range(n) if candidates is None or candidates[j]]
    best = sorted(pool, key=lambda j: (-scores[j], j))[:k]
    return sorted(best)


def ref_scores(attn, b, rows):
    """One sample: the mean over heads and the given query rows of the attention to every key."""
    _, h, _, n = attn.shape
    out = []
    for j in range(n):
        total = 0.0
        for head in range(h):
            for q in rows:
                total += attn[b, head, q, j].item()
        out.append(total / (h * len(rows)))
    return out


def dot(u, v):
    return sum(a * b for a, b in zip(u, v, strict=True))


def cosine(u, v):
    return dot(u, v) / (math.sqrt(dot(u, u)) * math.sqrt(dot(v, v)))


def vec_sum(vectors, weights):
    out = [0.0] * len(vectors[0]) if vectors else []
    for vec, w in zip(vectors, weights, strict=True):
        out = [o + w * x for o, x in zip(out, vec, strict=True)]
    return out


def key_rows(keys, b, combine_heads):
    """One sample's key vectors as lists: heads averaged ("mean") or side by side ("concat")."""
    if keys.dim() == 3:
        return [keys[b, j].tolist() for j in range(keys.shape[1])]
    h, n = keys.shape[1], keys.shape[2]
    rows = []
    for j in range(n):
        per_head = [keys[b, head, j].tolist() for head in range(h)]
        if combine_heads == "mean":
            rows.append([sum(col) / h for col in zip(*per_head, strict=True)])
        else:
            rows.append([x for head in per_head for x in head])
    return rows


def percentile(values, q):
    """Linear interpolation between order statistics (numpy's default)."""
    v = sorted(values)
    h = (len(v) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


# -------------------------------------------------------------------------------- attention_scores


def test_attention_scores_fixture():
    # one sample, two heads, two query rows; last row: head 0 (0.2, 0.3, 0.5), head 1 (0.4, 0.4, 0.2)
    attn = torch.tensor([[[[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], [[1.0, 0.0, 0.0], [0.4, 0.4, 0.2]]]])
    assert attention_scores(attn)[0].tolist() == pytest.approx([0.3, 0.35, 0.35])
    # row 0 of both heads is (1, 0, 0); rows 0 and 1 averaged: (0.65, 0.175, 0.175)
    assert attention_scores(attn, [0, 1])[0].tolist() == pytest.approx([0.65, 0.175, 0.175])


@pytest.mark.parametrize("seed", SEEDS)
def test_attention_scores_match_the_loop(seed):
    attn = torch.rand(3, 4, 5, 7, generator=gen(seed), dtype=torch.float64)
    for query, rows_of in ((-1, lambda b: [4]), (2, lambda b: [2]), ([0, 3, -1], lambda b: [0, 3, 4])):
        got = attention_scores(attn, query)
        for b in range(3):
            assert got[b].tolist() == pytest.approx(ref_scores(attn, b, rows_of(b)))
    per_sample = torch.tensor([4, 0, 2])
    got = attention_scores(attn, per_sample)
    for b in range(3):
        assert got[b].tolist() == pytest.approx(ref_scores(attn, b, [per_sample[b].item()]))


@pytest.mark.parametrize("call, name", [
    (lambda: attention_scores(torch.rand(2, 3, 4)), "attn"),
    (lambda: attention_scores(torch.rand(1, 2, 3, 4), 3), "query"),
    (lambda: attention_scores(torch.rand(1, 2, 3, 4), -4), "query"),
    (lambda: attention_scores(torch.rand(1, 2, 3, 4), []), "query"),
    (lambda: attention_scores(torch.rand(1, 2, 3, 4), [0, 5]), "query"),
    (lambda: attention_scores(torch.rand(2, 2, 3, 4), torch.tensor([0])), "query"),
    (lambda: attention_scores(torch.rand(2, 2, 3, 4), torch.tensor([0, 3])), "query"),
    (lambda: attention_scores(torch.rand(2, 2, 3, 4), torch.tensor([0.0, 1.0])), "query"),
])
def test_attention_scores_refusals(call, name):
    with pytest.raises(ConfigError, match=f"attention_scores: {name}=.*allowed"):
        call()


# ---------------------------------------------------------------------------------- top_k_in_order


def test_top_k_in_order_ties_go_to_the_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    # the two 0.9 (indices 1, 3), then the first of the three 0.5 (index 0)
    assert top_k_in_order(scores, 3).tolist() == [[0, 1, 3]]
    # without index 0 and 1: 0.9 at 3, then the 0.5 at 2 before the 0.5 at 5
    candidates = torch.tensor([[False, False, True, True, True, True]])
    assert top_k_in_order(scores, 2, candidates).tolist() == [[2, 3]]
    # a candidate scored -inf still beats a non-candidate scored -inf
    inf = float("-inf")
    assert top_k_in_order(torch.tensor([[inf, inf]]), 1, torch.tensor([[False, True]])).tolist() == [[1]]


@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_in_order_matches_the_loop(seed):
    g = gen(seed)
    scores = torch.randint(0, 5, (4, 13), generator=g).double()  # few values: many ties
    candidates = torch.rand(4, 13, generator=g) < 0.6
    candidates[:, :6] = True
    for k in (0, 1, 4, 6):
        for mask in (None, candidates):
            got = top_k_in_order(scores, k, mask)
            assert got.shape == (4, k)
            for b in range(4):
                row_mask = None if mask is None else mask[b].tolist()
                assert got[b].tolist() == ref_top_k(scores[b].tolist(), k, row_mask)


def test_top_k_in_order_of_all_candidates_is_every_candidate():
    candidates = torch.tensor([[True, False, True, True], [False, True, True, True]])
    got = top_k_in_order(torch.rand(2, 4, generator=gen(0)), 3, candidates)
    assert got.tolist() == [[0, 2, 3], [1, 2, 3]]


@pytest.mark.parametrize("call, name", [
    (lambda: top_k_in_order(torch.rand(2, 3, 4), 1), "scores"),
    (lambda: top_k_in_order(torch.rand(2, 4), 5), "k"),
    (lambda: top_k_in_order(torch.rand(2, 4), -1), "k"),
    (lambda: top_k_in_order(torch.rand(2, 4), True), "k"),
    (lambda: top_k_in_order(torch.rand(2, 4), 1.0), "k"),
    (lambda: top_k_in_order(torch.rand(2, 4), 3, torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]]).bool()), "k"),
    (lambda: top_k_in_order(torch.rand(2, 4), 1, torch.ones(2, 4)), "candidates"),
    (lambda: top_k_in_order(torch.rand(2, 4), 1, torch.ones(2, 5, dtype=torch.bool)), "candidates"),
])
def test_top_k_in_order_refusals(call, name):
    with pytest.raises(ConfigError, match=f"top_k_in_order: {name}=.*allowed"):
        call()


# -------------------------------------------------------------------------------- FastV, PyramidDrop


def test_fastv_fixture():
    # [system, img, img, img, img, text]; the last token's attention (one head) to each position
    last = torch.tensor([0.1, 0.3, 0.05, 0.25, 0.05, 0.25])
    attn = torch.zeros(1, 1, 6, 6)
    attn[0, 0, -1] = last
    image = torch.tensor([[False, True, True, True, True, False]])
    # image scores 0.3 (1), 0.05 (2), 0.25 (3), 0.05 (4): keep 2 -> 1 and 3
    assert fastv_keep(attn, image, 2).tolist() == [[0, 1, 3, 5]]
    # keep 3: the tie between 2 and 4 goes to 2
    assert fastv_keep(attn, image, 3).tolist() == [[0, 1, 2, 3, 5]]
    assert fastv_keep(attn, image, 0).tolist() == [[0, 5]]


@pytest.mark.parametrize("seed", SEEDS)
def test_fastv_matches_the_loop(seed):
    g = gen(seed)
    b, h, n = 3, 2, 19
    attn = torch.softmax(torch.randn(b, h, n, n, generator=g, dtype=torch.float64), dim=-1)
    image = torch.zeros(b, n, dtype=torch.bool)
    for i, start in enumerate((2, 5, 1)):  # samples differ in where the image starts
        image[i, start:start + 11] = True
    for keep in (0, 4, 7, 11):
        got = fastv_keep(attn, image, keep)
        assert got.shape == (b, n - 11 + keep)
        for i in range(b):
            scores = ref_scores(attn, i, [n - 1])
            chosen = ref_top_k(scores, keep, image[i].tolist())
            expected = sorted([j for j in range(n) if not image[i, j]] + chosen)
            assert got[i].tolist() == expected


def test_fastv_keeping_every_image_token_is_the_identity():
    attn = torch.rand(2, 2, 9, 9, generator=gen(0))
    image = torch.zeros(2, 9, dtype=torch.bool)
    image[:, 2:7] = True
    assert fastv_keep(attn, image, 5).tolist() == [list(range(9))] * 2


def test_fastv_sample_does_not_depend_on_the_batch():
    attn = torch.rand(3, 2, 11, 11, generator=gen(5))
    image = torch.zeros(3, 11, dtype=torch.bool)
    image[:, 3:9] = True
    together = fastv_keep(attn, image, 3)
    for i in range(3):
        assert torch.equal(fastv_keep(attn[i:i + 1], image[i:i + 1], 3), together[i:i + 1])


def test_fastv_keep_count():
    assert fastv_keep_count(576, 0.5) == 288
    assert fastv_keep_count(576, 0.75) == 144
    assert fastv_keep_count(576, 0.0) == 576
    assert fastv_keep_count(576, 1.0) == 0
    assert fastv_keep_count(5, 0.5) == 2  # round(2.5): halves go to even
    assert fastv_keep_count(7, 0.5) == 4  # round(3.5)


@pytest.mark.parametrize("call, who, name", [
    (lambda: fastv_keep(torch.rand(1, 1, 4, 4), torch.ones(1, 4, dtype=torch.bool), 5), "fastv_keep", "keep"),
    (lambda: fastv_keep(torch.rand(2, 1, 4, 4), torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).bool(), 1),
     "fastv_keep", "image_mask"),
    (lambda: fastv_keep(torch.rand(1, 1, 4, 4), torch.ones(1, 5, dtype=torch.bool), 1),
     "fastv_keep", "image_mask"),
    (lambda: fastv_keep(torch.rand(1, 4, 4), torch.ones(1, 4, dtype=torch.bool), 1), "fastv_keep", "attn"),
    (lambda: fastv_keep_count(576, 1.5), "fastv_keep_count", "prune_ratio"),
    (lambda: fastv_keep_count(-1, 0.5), "fastv_keep_count", "num_visual"),
])
def test_fastv_refusals(call, who, name):
    with pytest.raises(ConfigError, match=f"{who}: {name}=.*allowed"):
        call()


def test_pyramid_schedule_counts():
    # PyramidDrop's LLaVA-1.5 setting: 576 image tokens, layers 8/16/24, lambda = 0.5
    assert pyramid_schedule(576, [8, 16, 24], 0.5) == [288, 144, 72]
    assert pyramid_schedule(576, [8, 16, 24], [0.5, 0.25, 0.125]) == [288, 144, 72]
    assert pyramid_schedule(575, [8, 16, 24], 0.5) == [287, 143, 71]  # floors
    # 100 * 0.7^2 is 49 exactly (the binary float product is 48.999...)
    assert pyramid_schedule(100, [2, 4, 6], 0.7) == [70, 49, 34]
    assert pyramid_schedule(100, [2, 4, 6], [0.7, 0.49, 0.343]) == [70, 49, 34]
    assert pyramid_schedule(576, [8, 16], 1.0) == [576, 576]  # no reduction
    assert pyramid_schedule(576, [], 0.5) == []


def test_pyramid_schedule_matches_the_loop():
    for n in (1, 7, 99, 576, 577):
        for lam in (0.3, 0.5, 0.75, 0.9):
            remaining_exact = []
            numerator, denominator = round(lam * 100), 100  # lambda as the decimal it is written as
            for s in range(1, 5):
                remaining_exact.append(n * numerator ** s // denominator ** s)
            assert pyramid_schedule(n, [3, 6, 9, 12], lam) == remaining_exact


@pytest.mark.parametrize("call, name", [
    (lambda: pyramid_schedule(576, [8, 8, 24], 0.5), "layers"),
    (lambda: pyramid_schedule(576, [16, 8], 0.5), "layers"),
    (lambda: pyramid_schedule(576, [8, -1], 0.5), "layers"),
    (lambda: pyramid_schedule(576, [8, 16], 0.0), "ratio"),
    (lambda: pyramid_schedule(576, [8, 16], 1.5), "ratio"),
    (lambda: pyramid_schedule(576, [8, 16], [0.5]), "ratio"),
    (lambda: pyramid_schedule(576, [8, 16], [0.25, 0.5]), "ratio"),
    (lambda: pyramid_schedule(576.0, [8, 16], 0.5), "num_visual"),
])
def test_pyramid_schedule_refusals(call, name):
    with pytest.raises(ConfigError, match=f"pyramid_schedule: {name}=.*allowed"):
        call()


def test_pyramid_stages_chain_fastv_keep():
    """Three stages, each keeping its count of the image tokens still present by the query's scores."""
    g = gen(3)
    n_text, v = 5, 24
    counts = pyramid_schedule(v, [2, 4, 6], 0.5)
    positions = torch.arange(n_text + v + 3).expand(2, -1)  # original positions of the current tokens
    for count in counts:
        n = positions.shape[1]
        attn = torch.softmax(torch.randn(2, 2, 1, n, generator=g), dim=-1)  # the query row only
        image = (positions >= n_text) & (positions < n_text + v)
        kept = fastv_keep(attn, image, count, query=0)
        positions = positions.gather(1, kept)
        assert int(((positions >= n_text) & (positions < n_text + v)).sum(1)[0]) == count
    assert positions.shape[1] == n_text + 3 + counts[-1] == 11
    assert bool((positions[:, 1:] > positions[:, :-1]).all())  # order kept


# ---------------------------------------------------------------------------------------- VisionZip


def ref_visionzip(cls_attention, keys, hidden, dominant, contextual, prefix, keep_prefix, merge):
    """Per sample: (token rows, dest list)."""
    b_count, n, _ = hidden.shape
    outs, dests = [], []
    for b in range(b_count):
        if cls_attention.dim() == 3:
            s = [sum(cls_attention[b, h, j].item() for h in range(cls_attention.shape[1])) for j in range(n)]
        else:
            s = cls_attention[b].tolist()
        kept_prefix = list(range(prefix)) if keep_prefix else []
        n_dom = dominant - len(kept_prefix)
        dom = sorted(sorted(range(prefix, n), key=lambda j: (-s[j], j))[:n_dom])
        rest = [j for j in range(prefix, n) if j not in dom]
        m = len(rest)
        targets, others = [], []
        if contextual:
            step = max(1, m // contextual)
            targets = [rest[i] for i in range(0, m, step)][:contextual]
            others = [j for j in rest if j not in targets]
        k = key_rows(keys, b, "mean")
        groups = {t: [] for t in targets}
        for o in others:
            sims = [cosine(k[o], k[t]) for t in targets]
            best = max(range(len(targets)), key=lambda i: (sims[i], -i))  # first maximum
            groups[targets[best]].append(o)
        slots = [[j] for j in kept_prefix] + [[j] for j in dom] + [[t] + groups[t] for t in targets]
        rows = []
        for members in slots:
            vectors = [hidden[b, j].tolist() for j in members]
            if merge == "mean" or len(members) == 1:
                rows.append([sum(col) / len(members) for col in zip(*vectors, strict=True)])
            else:
                member_mean = [sum(col) / (len(members) - 1) for col in zip(*vectors[1:], strict=True)]
                rows.append([x + y for x, y in zip(vectors[0], member_mean, strict=True)])
        dest = [len(slots)] * n
        for slot, members in enumerate(slots):
            for j in members:
                dest[j] = slot
        outs.append(rows)
        dests.append(dest)
    return outs, dests


def test_visionzip_fixture():
    # CLS + 6 patches. CLS attention (one head) on patches 1..6: 0.05, 0.4, 0.1, 0.3, 0.1, 0.05
    cls = torch.tensor([[[0.9, 0.05, 0.4, 0.1, 0.3, 0.1, 0.05]]])
    # dominant=3 with the CLS: patches at 2 (0.4) and 4 (0.3). Remaining 1, 3, 5, 6 (M=4);
    # contextual=2: step 4 // 2 = 2, targets are remaining[0], remaining[2] = 1 and 5.
    # keys: 3 is nearest to 1 ([1, 0.1] vs [1, 0]), 6 nearest to 5 ([0.2, 1] vs [0, 1])
    keys = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.3, 0.3], [1.0, 0.1], [0.5, 0.5], [0.0, 1.0],
                          [0.2, 1.0]]])
    hidden = torch.tensor([[[100.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]])
    tokens, a = visionzip(cls, keys, hidden, 3, 2)
    # [CLS, 2, 4, mean(1, 3), mean(5, 6)]
    assert tokens[0, :, 0].tolist() == [100.0, 2.0, 4.0, 2.0, 5.5]
    assert a.dest.tolist() == [[0, 3, 1, 3, 2, 4, 4]] and a.n_out == 5
    assert a.merged.tolist() == [[False, False, False, True, False, False, True]]
    tokens, _ = visionzip(cls, keys, hidden, 3, 2, merge="target_plus_mean")
    assert tokens[0, :, 0].tolist() == [100.0, 2.0, 4.0, 1.0 + 3.0, 5.0 + 6.0]
    # without the CLS: dominant=2 patches, the CLS dropped (slot n_out)
    tokens, a = visionzip(cls, keys, hidden, 2, 2, keep_prefix=False)
    assert tokens[0, :, 0].tolist() == [2.0, 4.0, 2.0, 5.5]
    assert a.dest.tolist() == [[4, 2, 0, 2, 1, 3, 3]] and a.n_out == 4


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("merge", ["mean", "target_plus_mean"])
def test_visionzip_matches_the_loop(seed, merge):
    g = gen(seed)
    b, h, n, d = 3, 2, 23, 6
    cls = torch.rand(b, h, n, generator=g, dtype=torch.float64)
    keys = torch.randn(b, h, n, 4, generator=g, dtype=torch.float64)
    hidden = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    for dominant, contextual, keep_prefix in ((7, 5, True), (6, 4, False), (4, 3, True), (1, 21, True),
                                              (12, 0, True), (23, 0, True)):
        tokens, a = visionzip(cls, keys, hidden, dominant, contextual, keep_prefix=keep_prefix, merge=merge)
        rows, dests = ref_visionzip(cls, keys, hidden, dominant, contextual, 1, keep_prefix, merge)
        assert tokens.shape == (b, dominant + contextual, d)
        for i in range(b):
            assert a.dest[i].tolist() == dests[i]
            assert tokens[i].tolist() == [pytest.approx(r, abs=1e-5) for r in rows[i]]
    for prefix, dominant, keep_prefix in ((0, 5, True), (2, 6, True), (2, 4, False)):
        scores = cls.sum(1)  # already reduced over heads
        tokens, a = visionzip(scores, keys, hidden, dominant, 4, prefix=prefix, keep_prefix=keep_prefix,
                              merge=merge)
        rows, dests = ref_visionzip(scores, keys, hidden, dominant, 4, prefix, keep_prefix, merge)
        for i in range(b):
            assert a.dest[i].tolist() == dests[i]
            assert tokens[i].tolist() == [pytest.approx(r, abs=1e-5) for r in rows[i]]


def test_visionzip_reduced_attention_and_mean_keys_are_accepted():
    g = gen(7)
    cls = torch.rand(2, 3, 15, generator=g)
    keys = torch.randn(2, 3, 15, 4, generator=g)
    hidden = torch.randn(2, 15, 5, generator=g)
    full, a = visionzip(cls, keys, hidden, 5, 3)
    reduced, b = visionzip(cls.sum(1), keys.mean(1), hidden, 5, 3)
    assert torch.equal(a.dest, b.dest)
    assert torch.allclose(full, reduced)


@pytest.mark.parametrize("seed", SEEDS)
def test_visionzip_accounts_for_every_token_once(seed):
    g = gen(seed)
    b, n = 2, 30
    cls, keys = torch.rand(b, 2, n, generator=g), torch.randn(b, n, 8, generator=g)
    hidden = torch.randn(b, n, 3, generator=g)
    for dominant, contextual, keep_prefix in ((10, 6, True), (9, 6, False), (5, 0, True)):
        _, a = visionzip(cls, keys, hidden, dominant, contextual, keep_prefix=keep_prefix)
        n_dom_slots = dominant
        for i in range(b):
            dest = a.dest[i].tolist()
            assert all(0 <= s <= a.n_out for s in dest)  # one slot (or dropped) per token
            members = [[j for j in range(n) if dest[j] == s] for s in range(a.n_out)]
            assert all(len(ms) >= 1 for ms in members)
            assert all(len(ms) == 1 for ms in members[:n_dom_slots])  # prefix and dominant: alone
            assert members[: int(keep_prefix)] == [[0]] * int(keep_prefix)
            dropped = [j for j in range(n) if dest[j] == a.n_out]
            if contextual:
                assert dropped == ([] if keep_prefix else [0])
                assert sum(len(ms) for ms in members[n_dom_slots:]) == n - 1 - (dominant - int(keep_prefix))
            else:
                assert len(dropped) == n - dominant
            if a.merged is not None:  # each contextual slot: one target (not merged), the rest merged
                for ms in members[n_dom_slots:]:
                    assert sum(not a.merged[i, j] for j in ms) == 1
                assert not any(a.merged[i, ms[0]] for ms in members[:n_dom_slots])
            doms = [ms[0] for ms in members[int(keep_prefix):n_dom_slots]]
            assert doms == sorted(doms)  # dominant tokens in sequence order


def test_visionzip_without_reduction_is_the_identity():
    g = gen(0)
    cls, keys = torch.rand(2, 3, 12, generator=g), torch.randn(2, 12, 4, generator=g)
    hidden = torch.randn(2, 12, 5, generator=g)
    for merge in ("mean", "target_plus_mean"):
        tokens, a = visionzip(cls, keys, hidden, 12, 0, merge=merge)
        assert torch.equal(tokens, hidden)
        assert a.dest.tolist() == [list(range(12))] * 2
    tokens, _ = visionzip(cls, keys, hidden, 11, 0, keep_prefix=False)
    assert torch.equal(tokens, hidden[:, 1:])


def test_visionzip_sample_does_not_depend_on_the_batch():
    g = gen(4)
    cls, keys = torch.rand(3, 2, 17, generator=g), torch.randn(3, 2, 17, 4, generator=g)
    hidden = torch.randn(3, 17, 5, generator=g)
    together, a = visionzip(cls, keys, hidden, 6, 4, merge="target_plus_mean")
    for i in range(3):
        alone, b = visionzip(cls[i:i + 1], keys[i:i + 1], hidden[i:i + 1], 6, 4, merge="target_plus_mean")
        assert torch.equal(b.dest, a.dest[i:i + 1])
        assert torch.allclose(alone, together[i:i + 1])


def test_visionzip_keeps_the_dtype():
    g = gen(1)
    hidden = torch.randn(1, 10, 4, generator=g).bfloat16()
    tokens, _ = visionzip(torch.rand(1, 2, 10, generator=g), torch.randn(1, 10, 3, generator=g), hidden, 4, 2)
    assert tokens.dtype == torch.bfloat16


def _vz(**over):
    g = gen(0)
    args = dict(cls_attention=torch.rand(1, 2, 8, generator=g), keys=torch.randn(1, 8, 3, generator=g),
                hidden=torch.randn(1, 8, 4, generator=g), dominant=3, contextual=2)
    args.update(over)
    return lambda: visionzip(**args)


@pytest.mark.parametrize("call, name", [
    (_vz(dominant=9), "dominant"),
    (_vz(dominant=0), "dominant"),  # the kept CLS counts among the dominant tokens
    (_vz(contextual=6), "contextual"),  # 8 - 1 - 2 = 5 remaining patches
    (_vz(contextual=-1), "contextual"),
    (_vz(merge="sum"), "merge"),
    (_vz(keep_prefix=1), "keep_prefix"),
    (_vz(prefix=9), "prefix"),
    (_vz(cls_attention=torch.rand(1, 2, 7)), "cls_attention"),
    (_vz(cls_attention=torch.rand(1, 2, 3, 8)), "cls_attention"),
    (_vz(keys=torch.randn(1, 7, 3)), "keys"),
    (_vz(hidden=torch.randn(8, 4)), "hidden"),
])
def test_visionzip_refusals(call, name):
    with pytest.raises(ConfigError, match=f"visionzip: {name}=.*allowed"):
        call()


# -------------------------------------------------------------------------------------- PruMerge


def ref_prumerge(cls_attention, keys, hidden, plus, prefix, neighbours, add_self, normalise_weights,
                 extra_token, order, min_keep):
    """Per sample: (token rows, input positions)."""
    b_count, n, _ = hidden.shape
    results = []
    for b in range(b_count):
        a = cls_attention[b, prefix:].tolist()
        y = [hidden[b, j].tolist() for j in range(prefix, n)]
        k = key_rows(keys, b, "concat")[prefix:]
        m = len(a)
        q1, q3 = percentile(a, 0.25), percentile(a, 0.75)
        count = sum(1 for x in a if x > q3 + 1.5 * (q3 - q1))
        n_keep = max(count, min_keep)
        top = sorted(range(m), key=lambda j: (-a[j], j))[:n_keep]
        samples = []
        if plus:
            stride = max(1, (m // max(n_keep, 1)) // 3)
            samples = [p for p in range(0, m - 1, stride) if p not in top]
        kept = top + samples if order == "attention" else sorted(top + samples)
        rows = []
        for i in kept:
            others = [j for j in range(m) if j != i]
            near = sorted(others, key=lambda j: (-cosine(k[i], k[j]), j))[:neighbours]
            w = [a[j] for j in near]
            if normalise_weights:
                w = [x / sum(w) for x in w]
            pull = vec_sum([y[j] for j in near], w) if near else [0.0] * len(y[i])
            rows.append([s + p for s, p in zip(y[i], pull, strict=True)] if add_self else pull)
        index = [i + prefix for i in kept]
        if extra_token:
            rest = [j for j in range(m) if j not in kept]
            rows.append(vec_sum([y[j] for j in rest], [a[j] for j in rest]) if rest else [0.0] * len(y[0]))
            index.append(-1)
        results.append((rows, index))
    return results


def test_iqr_outlier_count_matches_numpy_style_percentiles():
    g = gen(0)
    scores = torch.rand(5, 21, generator=g, dtype=torch.float64) ** 4  # skewed: some outliers
    got = iqr_outlier_count(scores)
    for b in range(5):
        a = scores[b].tolist()
        q1, q3 = percentile(a, 0.25), percentile(a, 0.75)
        assert got[b].item() == sum(1 for x in a if x > q3 + 1.5 * (q3 - q1))


def _prumerge_fixture():
    # CLS + 8 patches. Patch attention 0.01 ... 0.07 and 0.9: sorted, Q1 = 0.0275 and Q3 = 0.0625
    # (linear interpolation at 1.75 and 5.25), upper fence 0.0625 + 1.5 * 0.035 = 0.115: one outlier,
    # patch 7 (position 8).
    a = [0.5, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.9]
    keys = [[0.0, 1.0], [1.0, 0.1], [1.0, 0.2], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0],
            [1.0, 0.0]]
    hidden = [[0.0], [10.0], [20.0], [30.0], [40.0], [50.0], [60.0], [70.0], [80.0]]
    return torch.tensor([a], dtype=torch.float64), torch.tensor([keys], dtype=torch.float64), \
        torch.tensor([hidden], dtype=torch.float64)


def test_prumerge_fixture():
    a, keys, hidden = _prumerge_fixture()
    out = prumerge(a, keys, hidden, neighbours=2)
    # patch 7's two nearest keys are patches 0 and 1: 80 + 0.01 * 10 + 0.02 * 20 = 80.5;
    # the extra token sums the 7 others: 0.1 + 0.4 + 0.9 + 1.6 + 2.5 + 3.6 + 4.9 = 14
    assert out.index.tolist() == [[8, -1]]
    assert out.valid.tolist() == [[True, True]]
    assert out.tokens[0, :, 0].tolist() == [pytest.approx(80.5), pytest.approx(14.0)]
    # without the extra token and the token itself: the weighted sum alone; normalised: the weighted mean
    out = prumerge(a, keys, hidden, neighbours=2, add_self=False, extra_token=False)
    assert out.tokens[0, :, 0].tolist() == [pytest.approx(0.5)]
    out = prumerge(a, keys, hidden, neighbours=2, add_self=False, extra_token=False, normalise_weights=True)
    assert out.tokens[0, :, 0].tolist() == [pytest.approx(0.5 / 0.03)]


def test_prumerge_plus_fixture():
    a, keys, hidden = _prumerge_fixture()
    out = prumerge(a, keys, hidden, plus=True, neighbours=2)
    # 8 patches, 1 kept: stride (8 // 1) // 3 = 2, samples at patches 0, 2, 4, 6 (below 7)
    assert out.index.tolist() == [[8, 1, 3, 5, 7, -1]]
    # patch 0 (key [1, 0.1]): nearest are patch 1 (cos 0.99523) and patch 7 (0.99504):
    # 10 + 0.02 * 20 + 0.9 * 80 = 82.4; the extra token: patches 1, 3, 5: 0.4 + 1.6 + 3.6 = 5.6
    assert out.tokens[0, 1, 0].item() == pytest.approx(82.4)
    assert out.tokens[0, -1, 0].item() == pytest.approx(5.6)
    out = prumerge(a, keys, hidden, plus=True, neighbours=2, order="position")
    assert out.index.tolist() == [[1, 3, 5, 7, 8, -1]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_matches_the_loop(seed, plus):
    g = gen(seed)
    b, h, n, d = 3, 2, 26, 5
    logits = torch.randn(b, n, generator=g, dtype=torch.float64) * 2
    logits[1, 3:6] += 4  # samples differ in how many outliers they have
    cls = torch.softmax(logits, dim=-1)
    keys = torch.randn(b, h, n, 3, generator=g, dtype=torch.float64)
    hidden = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    settings = [dict(), dict(neighbours=4, order="position"), dict(neighbours=0, extra_token=False),
                dict(add_self=False, normalise_weights=True, neighbours=7), dict(min_keep=5, neighbours=3),
                dict(prefix=0, neighbours=6), dict(prefix=2, neighbours=6, order="position")]
    for kw in settings:
        full = dict(prefix=1, neighbours=32 if "neighbours" not in kw else kw["neighbours"], add_self=True,
                    normalise_weights=False, extra_token=True, order="attention", min_keep=1)
        full.update(kw)
        full["neighbours"] = min(full["neighbours"], n - full["prefix"] - 1)
        out = prumerge(cls, keys, hidden, plus, **full)
        expected = ref_prumerge(cls, keys, hidden, plus, **full)
        width = max(len(index) for _, index in expected)
        assert out.tokens.shape == (b, width, d) and out.valid.shape == out.index.shape == (b, width)
        for i, (rows, index) in enumerate(expected):
            count = len(index)
            assert out.valid[i].tolist() == [True] * count + [False] * (width - count)
            assert out.index[i].tolist() == index + [-1] * (width - count)
            assert out.tokens[i, :count].tolist() == [pytest.approx(r, abs=1e-9) for r in rows]
            assert not out.tokens[i, count:].any()  # padding is zero


def test_prumerge_counts_differ_per_sample_and_do_not_depend_on_the_batch():
    g = gen(11)
    logits = torch.randn(3, 30, generator=g)
    logits[0, 5:12] += 5  # many outliers
    logits[2, 7] += 5  # one
    cls, keys, hidden = torch.softmax(logits, -1), torch.randn(3, 30, 6, generator=g), torch.randn(3, 30, 4, generator=g)
    for plus in (False, True):
        together = prumerge(cls, keys, hidden, plus, neighbours=5)
        counts = together.valid.sum(1).tolist()
        assert len(set(counts)) > 1
        for i in range(3):
            alone = prumerge(cls[i:i + 1], keys[i:i + 1], hidden[i:i + 1], plus, neighbours=5)
            assert alone.valid.sum().item() == counts[i]
            assert torch.equal(alone.index[0], together.index[i, :counts[i]])
            assert torch.allclose(alone.tokens[0], together.tokens[i, :counts[i]], atol=1e-6)


def test_prumerge_without_outliers():
    # equal attention: Q1 = Q3, the fence is the value itself and nothing lies strictly above it
    cls = torch.full((1, 7), 1 / 7)
    hidden = torch.arange(7.0).view(1, 7, 1)
    keys = torch.randn(1, 7, 3, generator=gen(0))
    out = prumerge(cls, keys, hidden, min_keep=0, neighbours=2)
    assert out.index.tolist() == [[-1]]  # the extra token alone: (1 + ... + 6) / 7 = 3
    assert out.tokens[0, 0, 0].item() == pytest.approx(3.0)
    out = prumerge(cls, keys, hidden, neighbours=0, extra_token=False)  # min_keep=1: the first patch
    assert out.index.tolist() == [[1]] and out.tokens[0, 0, 0].item() == 1.0
    out = prumerge(cls, keys, hidden, True, min_keep=0, neighbours=0, extra_token=False)
    # PruMerge+ with none kept: the stride takes the count as 1, (6 // 1) // 3 = 2: patches 0, 2, 4
    assert out.index.tolist() == [[1, 3, 5]]


def test_prumerge_plus_keeping_every_patch_adds_no_extra_token():
    # 8 patches, 2 outliers: stride (8 // 2) // 3 = 1 samples patches 0..6, with the outliers all 8 are kept;
    # nothing is left for the extra token, so an image never holds more tokens than its patches
    cls = torch.tensor([[0.0] + [0.1] * 6 + [5.0, 6.0]])
    hidden = torch.randn(1, 9, 4, generator=gen(1))
    keys = torch.randn(1, 9, 3, generator=gen(2))
    out = prumerge(cls, keys, hidden, True, neighbours=0)
    assert int(out.valid.sum()) == 8 and sorted(out.index[out.valid].tolist()) == list(range(1, 9))
    fewer = prumerge(cls, keys, hidden, False, neighbours=0)  # PruMerge alone: 2 kept and the extra token
    assert int(fewer.valid.sum()) == 3 and fewer.index[0, 2].item() == -1


def test_prumerge_kept_tokens_without_updates_are_the_inputs():
    """No neighbours and no extra token: the kept patches, unchanged, each once."""
    g = gen(2)
    cls = torch.softmax(torch.randn(2, 20, generator=g) * 3, -1)
    hidden = torch.randn(2, 20, 4, generator=g)
    out = prumerge(cls, torch.randn(2, 20, 3, generator=g), hidden, True, neighbours=0, extra_token=False)
    for i in range(2):
        index = out.index[i, out.valid[i]]
        assert len(set(index.tolist())) == len(index) and int(index.min()) >= 1
        assert torch.equal(out.tokens[i, out.valid[i]], hidden[i, index])


def _pm(**over):
    g = gen(0)
    args = dict(cls_attention=torch.rand(1, 9, generator=g), keys=torch.randn(1, 9, 3, generator=g),
                hidden=torch.randn(1, 9, 4, generator=g), neighbours=2)
    args.update(over)
    return lambda: prumerge(**args)


@pytest.mark.parametrize("call, name", [
    (_pm(neighbours=8), "neighbours"),  # 8 patches: at most 7 others
    (_pm(neighbours=-1), "neighbours"),
    (_pm(min_keep=9), "min_keep"),
    (_pm(order="random"), "order"),
    (_pm(plus="yes"), "plus"),
    (_pm(add_self=None), "add_self"),
    (_pm(prefix=9), "prefix"),
    (_pm(cls_attention=torch.rand(1, 2, 9)), "cls_attention"),
    (_pm(cls_attention=torch.rand(1, 8)), "cls_attention"),
    (_pm(keys=torch.randn(2, 9, 3)), "keys"),
    (_pm(hidden=torch.randn(1, 9)), "hidden"),
])
def test_prumerge_refusals(call, name):
    with pytest.raises(ConfigError, match=f"prumerge: {name}=.*allowed"):
        call()


# ----------------------------------------------------------------------------------------------- DART


def ref_dart(tokens, keys, image_mask, keep, image_pivots, text_pivots, norm_p):
    b_count, n, _ = tokens.shape
    results = []
    for b in range(b_count):
        k = key_rows(keys, b, "concat")
        norms = [sum(abs(x) ** norm_p for x in row) ** (1 / norm_p) for row in k]
        image = [j for j in range(n) if image_mask[b, j]]
        text = [j for j in range(n) if j > max(image)]
        img_piv = sorted(image, key=lambda j: (-norms[j], j))[:image_pivots]
        txt_piv = sorted(text, key=lambda j: (-norms[j], j))[:text_pivots]
        quota = keep // (image_pivots + text_pivots)
        x = [tokens[b, j].tolist() for j in range(n)]
        available = [j for j in image if j not in img_piv]
        kept = set(img_piv)
        for p in sorted(img_piv + txt_piv):
            taken = sorted(available, key=lambda j: (cosine(x[p], x[j]), j))[:quota]
            kept.update(taken)
            available = [j for j in available if j not in taken]
        results.append(sorted(set(j for j in range(n) if not image_mask[b, j]) | kept))
    return results


def test_dart_fixture():
    # [system, img x5 (1..5), text x2 (6, 7)]; one image pivot, one text pivot, quota 2 // 2 = 1
    image = torch.tensor([[False, True, True, True, True, True, False, False]])
    # L1 key norms: image pivot 3 (norm 5), text pivot 7 (norm 4)
    keys = torch.tensor([[[9.0, 0], [1, 0], [1, 1], [3, -2], [0, 1], [1, 0], [1, 1], [-2, 2]]])
    # pivot 3 (sequence order first) takes the token least similar to [1, 0]: 2 ([-1, 0], cos -1);
    # pivot 7 ([0, 1]) then takes 1 (cos 0.0995) over 5 (0.707) and 4 (1)
    tokens = torch.tensor([[[0.0, 1], [1, 0.1], [-1, 0], [1, 0], [0, 1], [0.5, 0.5], [1, 1], [0, 1]]])
    assert dart_keep(tokens, keys, image, 2, 1, 1).tolist() == [[0, 1, 2, 3, 6, 7]]
    # (walking the pivots 7 then 3 would keep 2 and 4 instead: the order is part of the rule)
    # a budget that keeps every image token: 1 + 2 * (4 // 2) = 5
    assert dart_keep(tokens, keys, image, 4, 1, 1).tolist() == [list(range(8))]
    assert dart_keep(tokens, keys, image, 0, 1, 1).tolist() == [[0, 3, 6, 7]]  # the image pivot alone


@pytest.mark.parametrize("seed", SEEDS)
def test_dart_matches_the_loop(seed):
    g = gen(seed)
    b, h, n, d = 3, 2, 31, 6
    tokens = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    keys = torch.randn(b, h, n, 3, generator=g, dtype=torch.float64)
    image = torch.zeros(b, n, dtype=torch.bool)
    for i, start in enumerate((3, 1, 6)):
        image[i, start:start + 19] = True
    for keep, ip, tp, p in ((8, 2, 2, 1.0), (9, 3, 1, 2.0), (5, 1, 4, 1.0), (15, 0, 3, 1.0), (12, 4, 0, 1.5)):
        got = dart_keep(tokens, keys, image, keep, ip, tp, norm_p=p)
        assert got.shape == (b, n - 19 + dart_keep_count(keep, ip, tp))
        assert got.tolist() == ref_dart(tokens, keys, image, keep, ip, tp, p)


def test_dart_keep_count():
    assert dart_keep_count(128) == 132  # the reference's 128-token setting: 4 + 8 * 16
    assert dart_keep_count(64) == 68
    assert dart_keep_count(130, 4, 4) == 132  # quotas floor
    assert dart_keep_count(10, 0, 3) == 9


def test_dart_sample_does_not_depend_on_the_batch():
    g = gen(9)
    tokens, keys = torch.randn(3, 20, 5, generator=g), torch.randn(3, 20, 4, generator=g)
    image = torch.zeros(3, 20, dtype=torch.bool)
    image[:, 2:14] = True
    together = dart_keep(tokens, keys, image, 6, 2, 1)
    for i in range(3):
        alone = dart_keep(tokens[i:i + 1], keys[i:i + 1], image[i:i + 1], 6, 2, 1)
        assert torch.equal(alone, together[i:i + 1])


def test_dart_text_mask_chooses_the_text_pivots():
    g = gen(1)
    tokens, keys = torch.randn(1, 12, 4, generator=g), torch.randn(1, 12, 3, generator=g)
    image = torch.zeros(1, 12, dtype=torch.bool)
    image[0, 2:9] = True
    after = torch.zeros(1, 12, dtype=torch.bool)
    after[0, 9:] = True
    assert torch.equal(dart_keep(tokens, keys, image, 4, 1, 2),
                       dart_keep(tokens, keys, image, 4, 1, 2, text_mask=after))


def _dart(**over):
    g = gen(0)
    image = torch.zeros(1, 10, dtype=torch.bool)
    image[0, 1:7] = True
    args = dict(tokens=torch.randn(1, 10, 4, generator=g), keys=torch.randn(1, 10, 3, generator=g),
                image_mask=image, keep=2, image_pivots=1, text_pivots=1)
    args.update(over)
    return lambda: dart_keep(**args)


@pytest.mark.parametrize("call, who, name", [
    (_dart(keep=6), "dart_keep", "keep"),  # 1 + 2 * 3 = 7 > 6 image tokens
    (_dart(image_pivots=7), "dart_keep", "image_pivots"),
    (_dart(text_pivots=4), "dart_keep", "text_pivots"),  # 3 tokens after the image
    (_dart(image_pivots=0, text_pivots=0), "dart_keep_count", "image_pivots \\+ text_pivots"),
    (_dart(keep=-1), "dart_keep_count", "keep"),
    (_dart(norm_p=0), "dart_keep", "norm_p"),
    (_dart(keys=torch.randn(1, 9, 3)), "dart_keep", "keys"),
    (_dart(image_mask=torch.ones(1, 10)), "dart_keep", "image_mask"),
    (_dart(text_mask=torch.ones(1, 9, dtype=torch.bool)), "dart_keep", "text_mask"),
])
def test_dart_refusals(call, who, name):
    with pytest.raises(ConfigError, match=f"{who}: {name}=.*allowed"):
        call()


def test_sequence_keep():
    image = torch.tensor([[False, True, True, True, False], [True, True, True, False, False]])
    assert sequence_keep(image, torch.tensor([[3], [0]])).tolist() == [[0, 3, 4], [0, 3, 4]]


# ------------------------------------------------------------------------------------------ SparseVLM


def ref_text_relevance(embeddings, image, text):
    """Per sample: r_t = mean over the image tokens v of softmax over the text tokens of h_v . h_t."""
    out = []
    for b in range(embeddings.shape[0]):
        rows = [t for t in text[b].tolist() if t >= 0]
        visual = [j for j in range(embeddings.shape[1]) if image[b, j]]
        h = [embeddings[b, j].tolist() for j in range(embeddings.shape[1])]
        r = [0.0] * len(rows)
        for v in visual:
            logits = [dot(h[v], h[t]) for t in rows]
            top = max(logits)
            e = [math.exp(x - top) for x in logits]
            for i in range(len(rows)):
                r[i] += e[i] / sum(e) / len(visual)
        out.append(r + [0.0] * (text.shape[1] - len(rows)))
    return out


def ref_attention_relevance(attn, image, text):
    _, h, t, n = attn.shape
    out = []
    for b in range(attn.shape[0]):
        visual = [j for j in range(n) if image[b, j]]
        row = []
        for i in range(t):
            if text[b, i] < 0:
                row.append(0.0)
                continue
            row.append(sum(attn[b, head, i, v].item() for head in range(h) for v in visual) / (h * len(visual)))
        out.append(row)
    return out


def rows_after_image(image, valid):
    """[B, T] rows: the valid tokens after each sample's last image token, then -1."""
    rows = []
    for b in range(image.shape[0]):
        last = max(j for j in range(image.shape[1]) if image[b, j])
        rows.append([j for j in range(last + 1, image.shape[1]) if valid[b, j]])
    width = max(map(len, rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


def sparse_inputs(seed, starts=(2, 1), counts=(10, 7), n=20, h=3, d=5, dtype=torch.float32):
    """Two samples whose image runs differ in length (as after a stage that kept per-sample counts)."""
    g = gen(seed)
    b = len(starts)
    image = torch.zeros(b, n, dtype=torch.bool)
    for i, (start, count) in enumerate(zip(starts, counts, strict=True)):
        image[i, start:start + count] = True
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, -1] = False  # the second sample has one text token less (padding, never a text row)
    text = rows_after_image(image, valid)
    attn = torch.softmax(torch.randn(b, h, text.shape[1], n, generator=g, dtype=dtype) * 2, dim=-1)
    hidden = torch.randn(b, n, d, generator=g, dtype=dtype)
    return attn, text, image, hidden


def ref_dpc(points, c):
    """DPC-KNN as the rule says, with Python floats: centres (ascending) and each point's centre slot."""
    m, width = len(points), len(points[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(points[i], points[j], strict=True))) / math.sqrt(width)
             for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(x * x for x in sorted(dist[i])[:c]) / c) for i in range(m)]
    largest = max(max(row) for row in dist)
    delta = []
    for i in range(m):
        denser = [j for j in range(m) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(dist[i][j] for j in denser) if denser else largest)
    centres = sorted(sorted(range(m), key=lambda i: (-delta[i] * density[i], i))[:c])
    assignment = [centres.index(i) if i in centres else min(range(c), key=lambda s: (dist[i][centres[s]], s))
                  for i in range(m)]
    return centres, assignment


def ref_sparsevlm(attn, text, raters, image, hidden, scale, bias, recycle, clusters, keep=None):
    """Per sample: kept positions, their states, the recycled positions, rated count, clusters, rank."""
    b_count, h, _, n = attn.shape
    out = []
    for b in range(b_count):
        visual = [j for j in range(n) if image[b, j]]
        rows = [i for i in range(text.shape[1]) if text[b, i] >= 0 and raters[b, i]]
        a = [[sum(attn[b, head, i, v].item() for head in range(h)) / h for v in visual] for i in rows]
        rank = int(torch.linalg.matrix_rank(torch.tensor(a, dtype=torch.float32)))
        score = {v: sum(a[r][x] for r in range(len(rows))) / len(rows) for x, v in enumerate(visual)}
        k = len(visual) if rank >= len(visual) else min(max(math.floor(scale * rank + bias), 0), len(visual))
        k = k if keep is None else min(k, keep)
        order = sorted(visual, key=lambda v: (-score[v], v))
        pruned = order[k:]
        m = min(len(pruned), math.floor(recycle * len(pruned)) + 1) if pruned and recycle else 0
        c = min(m, math.floor(clusters * m) + 1) if m else 0
        chosen = pruned[:m]
        states = {j: hidden[b, j].tolist() for j in range(n)}
        centres = []
        if m:
            centre_at, assignment = ref_dpc([states[j] for j in chosen], c)
            centres = [chosen[i] for i in centre_at]
            for slot, centre in enumerate(centres):
                members = [states[chosen[i]] for i in range(m) if assignment[i] == slot]
                states[centre] = [sum(col) / len(members) for col in zip(*members, strict=True)]
        positions = sorted([j for j in range(n) if not image[b, j]] + order[:k] + centres)
        out.append((positions, [states[j] for j in positions], centres, k, c, rank))
    return out


def test_text_relevance_matches_the_loop():
    g = gen(4)
    image = torch.zeros(2, 9, dtype=torch.bool)
    image[0, 1:5], image[1, 2:4] = True, True
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 8] = False
    text = rows_after_image(image, valid)
    embeddings = torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    got = text_relevance(embeddings, image, text)
    torch.testing.assert_close(got, torch.tensor(ref_text_relevance(embeddings, image, text), dtype=torch.float64))
    assert torch.allclose(got.sum(dim=1), torch.ones(2, dtype=torch.float64))  # a mean of softmaxes over the text


def test_attention_relevance_matches_the_loop():
    attn, text, image, _ = sparse_inputs(5, dtype=torch.float64)
    got = attention_relevance(attn, image, text)
    torch.testing.assert_close(got, torch.tensor(ref_attention_relevance(attn, image, text), dtype=torch.float64))


def test_select_raters_fixture():
    text = torch.tensor([[5, 6, 7, 8], [4, 5, -1, -1], [9, -1, -1, -1]])
    relevance = torch.tensor([[0.1, 0.4, 0.25, 0.25], [0.3, 0.3, 9.0, 9.0], [0.2, 0.0, 0.0, 0.0]])
    # mean 0.25: at or above it (0.25 itself counts); equal ones all rate; padding rows never
    assert select_raters(relevance, text).tolist() == [[False, True, True, True], [True, True, False, False],
                                                       [True, False, False, False]]


def test_sparsevlm_keep_count():
    assert sparsevlm_keep_count(576, 20) == 270  # the reference's 192-token setting: 13.5 * rank
    assert sparsevlm_keep_count(576, 20, 9, 6) == 186  # 128 tokens: 9 * rank + 6
    assert sparsevlm_keep_count(576, 5, 0.8) == 4  # 64 tokens: 0.8 * 5 is exactly 4 (decimal as written)
    assert sparsevlm_keep_count(576, 50) == 576  # 675 is more than there are: nothing pruned
    assert sparsevlm_keep_count(576, 20, keep=200) == 200  # a cap (the reference's v1.5 budgets)
    assert sparsevlm_keep_count(576, 20, 0, 66) == 66  # scale 0: exactly the bias
    assert sparsevlm_keep_count(8, 8, 0.5) == 8  # rank = V: the layer is skipped
    assert sparsevlm_keep_count(8, 8, 0.5, keep=3) == 3  # unless the cap is lower
    assert sparsevlm_keep_count(10, 2, 1, -5) == 0  # never below 0
    assert sparsevlm_keep_count(10, 0) == 0  # no raters' information: a rank of 0


def test_sparsevlm_recycle_counts():
    assert sparsevlm_recycle_counts(306) == (92, 10)  # 576 - 270 pruned: floor(91.8) + 1, floor(9.2) + 1
    assert sparsevlm_recycle_counts(10) == (4, 1)  # 0.3 * 10 is exactly 3 (decimal as written)
    assert sparsevlm_recycle_counts(1) == (1, 1)
    assert sparsevlm_recycle_counts(0) == (0, 0)
    assert sparsevlm_recycle_counts(10, 0) == (0, 0)  # recycling off
    assert sparsevlm_recycle_counts(10, 1, 1) == (10, 10)  # every pruned token, each its own cluster
    assert sparsevlm_recycle_counts(20, 0.5, 0.5) == (11, 6)


def test_density_peak_clusters_fixture():
    # two tight groups of three, far apart; two clusters: one centre in each, every point with its own group
    x = torch.tensor([[0.0, 0], [0.1, 0], [0, 0.1], [5, 5], [5.1, 5], [5, 5.2]])
    centres, assignment = density_peak_clusters(x, 2)
    assert len(set(assignment[:3].tolist())) == 1 and len(set(assignment[3:].tolist())) == 1
    assert assignment[0] != assignment[3]
    assert centres[0] < 3 <= centres[1] and assignment[centres].tolist() == [0, 1]
    # one cluster: every density is exp(0) (the nearest neighbour is the point itself): the tie goes to the
    # lowest index, which is then the only denser-than-none point and the centre
    centres, assignment = density_peak_clusters(x, 1)
    assert centres.tolist() == [0] and assignment.tolist() == [0] * 6


@pytest.mark.parametrize("seed", SEEDS)
def test_density_peak_clusters_match_the_loop(seed):
    g = gen(seed)
    x = torch.randn(13, 4, generator=g, dtype=torch.float64)
    for c in (1, 2, 4, 13):
        centres, assignment = density_peak_clusters(x, c)
        want_centres, want_assignment = ref_dpc(x.tolist(), c)
        assert centres.tolist() == want_centres and assignment.tolist() == want_assignment


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("setting", [(1.5, 0.0, 0.3, 0.1, None), (0.0, 4.0, 0.6, 0.5, None),
                                     (2.0, 1.0, 1.0, 0.4, 3), (1.0, 0.0, 0.0, 0.1, None)])
def test_sparsevlm_keep_matches_the_loop(seed, setting):
    scale, bias, recycle, clusters, keep = setting
    attn, text, image, hidden = sparse_inputs(seed, dtype=torch.float64)
    g = gen(seed + 100)
    raters = (torch.rand(text.shape, generator=g) < 0.6) & (text >= 0)
    raters[:, 0] = True  # at least one rater per sample
    out = sparsevlm_keep(attn, text, raters, image, hidden, scale=scale, bias=bias, keep=keep, recycle=recycle,
                         clusters=clusters)
    width = out.index.shape[1]
    for b, (positions, states, centres, k, c, rank) in enumerate(
            ref_sparsevlm(attn, text, raters, image, hidden, scale, bias, recycle, clusters, keep)):
        pad = width - len(positions)
        assert out.index[b].tolist() == [-1] * pad + positions
        torch.testing.assert_close(out.hidden[b, pad:], torch.tensor(states, dtype=torch.float64))
        assert out.hidden[b, :pad].abs().sum() == 0
        assert [positions[i] for i in range(len(positions)) if out.recycled[b, pad + i]] == sorted(centres)
        assert (out.visual[b], out.clusters[b], out.rank[b]) == (k, c, rank)
    assert width == max(len(r[0]) for r in ref_sparsevlm(attn, text, raters, image, hidden, scale, bias, recycle,
                                                         clusters, keep))


def test_sparsevlm_keep_counts_differ_per_sample_and_do_not_depend_on_the_batch():
    attn, text, image, hidden = sparse_inputs(7)
    raters = text >= 0
    together = sparsevlm_keep(attn, text, raters, image, hidden, scale=1.0)
    assert together.visual[0] != together.visual[1]  # ranks 4 and 3 (the text rows that rate)
    for b in range(2):
        t = text[b:b + 1, :int((text[b] >= 0).sum())]
        alone = sparsevlm_keep(attn[b:b + 1, :, :t.shape[1]], t, raters[b:b + 1, :t.shape[1]], image[b:b + 1],
                               hidden[b:b + 1], scale=1.0)
        pad = together.index.shape[1] - alone.index.shape[1]
        assert torch.equal(together.index[b, pad:], alone.index[0]) and (together.index[b, :pad] == -1).all()
        assert torch.equal(together.hidden[b, pad:], alone.hidden[0])


def test_sparsevlm_keep_without_pruning_is_the_identity():
    attn, text, image, hidden = sparse_inputs(8)
    out = sparsevlm_keep(attn, text, text >= 0, image, hidden, scale=0.0, bias=20.0)
    assert out.index.tolist() == [list(range(20))] * 2 and torch.equal(out.hidden, hidden)
    assert not out.recycled.any() and out.clusters.tolist() == [0, 0]


def test_sparsevlm_keep_keeps_the_dtype_and_recycles_in_float32():
    attn, text, image, hidden = sparse_inputs(9)
    out = sparsevlm_keep(attn, text, text >= 0, image, hidden.bfloat16(), scale=1.0, recycle=1.0, clusters=0.2)
    ref = sparsevlm_keep(attn, text, text >= 0, image, hidden.bfloat16().float(), scale=1.0, recycle=1.0,
                         clusters=0.2)
    assert out.hidden.dtype == torch.bfloat16 and torch.equal(out.index, ref.index)
    assert torch.equal(out.hidden, ref.hidden.bfloat16())


def _svlm(**over):
    attn, text, image, hidden = sparse_inputs(0)
    args = dict(text_attn=attn, text=text, raters=text >= 0, image_mask=image, hidden=hidden)
    args.update(over)
    return lambda: sparsevlm_keep(**args)


@pytest.mark.parametrize("call, who, name", [
    (_svlm(scale=-1.0), "sparsevlm_keep_count", "scale"),
    (_svlm(bias=float("nan")), "sparsevlm_keep_count", "bias"),
    (_svlm(keep=-2), "sparsevlm_keep_count", "keep"),
    (_svlm(recycle=1.5), "sparsevlm_recycle_counts", "recycle"),
    (_svlm(clusters=0.0), "sparsevlm_recycle_counts", "clusters"),
    (_svlm(text=torch.tensor([[15, 14, -1], [14, 15, 16]])), "sparsevlm_keep", "text"),  # not ascending
    (_svlm(text=torch.tensor([[-1, 14, 15], [14, 15, 16]])), "sparsevlm_keep", "text"),  # -1 before a row
    (_svlm(raters=torch.ones(2, 2, dtype=torch.bool)), "sparsevlm_keep", "raters"),
    (_svlm(image_mask=torch.ones(2, 20)), "sparsevlm_keep", "image_mask"),
    (_svlm(hidden=torch.randn(2, 19, 5)), "sparsevlm_keep", "text_attn"),
    (lambda: density_peak_clusters(torch.randn(4, 2), 5), "density_peak_clusters", "clusters"),
    (lambda: sparsevlm_recycle_counts(-1), "sparsevlm_recycle_counts", "pruned"),
    (lambda: select_raters(torch.rand(2, 3), torch.zeros(2, 4, dtype=torch.long)), "select_raters", "text"),
])
def test_sparsevlm_refusals(call, who, name):
    with pytest.raises(ConfigError, match=f"{who}: {name}=.*allowed"):
        call()
