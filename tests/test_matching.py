"""ToMe's bipartite soft matching against a brute-force reference written with plain loops."""

import pytest
import torch

from tokenreduce.core.matching import alternate_split, bipartite_soft_matching, matching_macs
from tokenreduce.core.merge import combine, source_matrix, update_source


def reference_merge(x, sizes, metric, r, num_prefix):
    """Spec of methods.md, one image at a time: even positions are A, odd are B; prefix tokens are
    never a source (A) nor a destination (B); the r best A->B edges merge, size-weighted; output
    is prefix tokens, unmerged A tokens in order, then B tokens."""
    xs, ss = [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        m = metric[b].double()
        m = m / m.norm(dim=-1, keepdim=True)
        set_a = [i for i in range(n) if i % 2 == 0]
        set_b = [i for i in range(n) if i % 2 == 1]
        best = {}
        for a in set_a:
            if a < num_prefix:
                best[a] = (float("-inf"), None)
                continue
            cands = [(float(m[a] @ m[j]), j) for j in set_b if j >= num_prefix]
            score, dst = max(cands, key=lambda c: c[0])
            best[a] = (score, dst)
        sources = sorted(set_a, key=lambda a: -best[a][0])[:r]
        kept_a = [a for a in set_a if a not in sources and a >= num_prefix]
        groups = [[i] for i in range(num_prefix)] + [[a] for a in kept_a]
        groups += [[j] + [a for a in sources if best[a][1] == j] for j in set_b if j >= num_prefix]
        rows, row_sizes = [], []
        for g in groups:
            w = sizes[b, g, 0].double()
            rows.append((x[b, g].double() * w[:, None]).sum(0) / w.sum())
            row_sizes.append(w.sum())
        xs.append(torch.stack(rows))
        ss.append(torch.stack(row_sizes))
    return torch.stack(xs).float(), torch.stack(ss)[..., None].float()


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])  # none, class, class + distillation, class + 4 registers
@pytest.mark.parametrize("n_patches, r", [(16, 1), (16, 8), (17, 5), (49, 20)])
def test_matches_brute_force(num_prefix, n_patches, r):
    g = torch.Generator().manual_seed(num_prefix * 100 + n_patches + r)
    n = num_prefix + n_patches
    x = torch.randn(3, n, 6, generator=g)
    metric = torch.randn(3, n, 4, generator=g)
    sizes = torch.randint(1, 5, (3, n, 1), generator=g).float()
    sizes[:, :num_prefix] = 1
    r = min(r, n_patches // 2)
    assignment = bipartite_soft_matching(metric, r, num_prefix)
    got_x, got_s = combine(x, sizes, assignment)
    want_x, want_s = reference_merge(x, sizes, metric, r, num_prefix)
    assert got_x.shape == (3, n - r, 6)
    torch.testing.assert_close(got_s, want_s)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
    # prefix tokens first and bit-identical
    assert torch.equal(got_x[:, :num_prefix], x[:, :num_prefix])


def test_unit_sizes_give_the_same_result_as_none():
    g = torch.Generator().manual_seed(1)
    x, metric = torch.randn(2, 11, 5, generator=g), torch.randn(2, 11, 3, generator=g)
    a = bipartite_soft_matching(metric, 4, 1)
    got = combine(x, None, a)
    want = combine(x, torch.ones(2, 11, 1), a)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_nothing_to_merge_returns_none():
    metric = torch.randn(1, 5, 3)
    assert bipartite_soft_matching(metric, 0, 1) is None
    assert bipartite_soft_matching(metric[:, :2], 3, 1) is None  # one patch: no A token to merge


def test_matching_uses_no_gradient_but_merge_does():
    x = torch.randn(1, 9, 4, requires_grad=True)
    a = bipartite_soft_matching(x, 3, 1)
    assert not a.dest.requires_grad
    out, sizes = combine(x, None, a)
    out.sum().backward()
    # d(sum of group means)/dx_i = 1 / size of the group token i went into
    expected = (1 / sizes[0, a.dest[0], 0])[None, :, None].expand_as(x)
    torch.testing.assert_close(x.grad, expected)


def test_split_and_macs():
    a, b = alternate_split(1, 196)  # class token at position 0: patches 1, 3, ... are B
    assert len(range(196)[a]) == 98 and len(range(196)[b]) == 98
    assert range(196)[b][0] == 0
    assert matching_macs(1, 197, 64) == 98 * 98 * 64
    a, b = alternate_split(2, 5)
    assert list(range(5)[a]) == [0, 2, 4]


def test_source_map_follows_every_input_token():
    g = torch.Generator().manual_seed(3)
    n = 21
    source = torch.arange(n).expand(2, -1).clone()
    sizes = None
    x = torch.randn(2, n, 4, generator=g)
    for r in (5, 4, 3):
        a = bipartite_soft_matching(torch.randn(2, x.shape[1], 3, generator=g), r, 1)
        x, sizes = combine(x, sizes, a)
        source = update_source(source, a)
    mat = source_matrix(source, x.shape[1])
    assert torch.equal(mat.sum(1), torch.ones(2, n))  # each input token in exactly one token
    assert torch.equal(mat.sum(2, keepdim=True), sizes)  # a token's size counts its inputs
    assert torch.equal(source[:, 0], torch.zeros(2, dtype=torch.long))  # class token stays token 0


@pytest.mark.parametrize("mode", ["wavg", "mean", "mlerp", "prune"])
def test_bfloat16_merge_matches_float32_for_the_same_assignment(mode):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 41, 16, generator=g)
    sizes = torch.randint(1, 300, (2, 41, 1), generator=g).float()  # beyond bfloat16's exact integers
    a = bipartite_soft_matching(torch.randn(2, 41, 8, generator=g), 15, 1)
    want_x, want_s = combine(x, sizes, a, mode)
    got_x, got_s = combine(x.bfloat16(), sizes, a, mode)
    assert got_x.dtype == torch.bfloat16 and torch.equal(got_s, want_s)
    torch.testing.assert_close(got_x.float(), want_x, rtol=1e-2, atol=1e-2)
