"""MLERP and prune-in-matching in `combine`, against plain loops and hand-computed cases."""

import pytest
import torch

from tokenreduce.core.merge import Assignment, combine
from tokenreduce.errors import ConfigError


def random_assignment(batch, n, n_out, seed):
    """Every slot gets at least one token; the first token of a slot is its representative."""
    g = torch.Generator().manual_seed(seed)
    dest = torch.cat([torch.arange(n_out).expand(batch, -1), torch.randint(0, n_out, (batch, n - n_out), generator=g)], 1)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    dest = dest.gather(1, perm)
    merged = torch.ones(batch, n, dtype=torch.bool)
    for b in range(batch):
        for s in range(n_out):
            merged[b, (dest[b] == s).nonzero()[0, 0]] = False
    return Assignment(dest=dest, n_out=n_out, merged=merged)


def members(assignment, b, s):
    return (assignment.dest[b] == s).nonzero().flatten().tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlerp_has_the_largest_member_norm_and_the_weighted_mean_direction(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 5, generator=g) * torch.rand(2, 12, 1, generator=g) * 3
    sizes = torch.randint(1, 5, (2, 12, 1), generator=g).float()
    assignment = random_assignment(2, 12, 5, seed)
    out, new_sizes = combine(x, sizes, assignment, mode="mlerp")
    for b in range(2):
        for s in range(5):
            idx = members(assignment, b, s)
            weights = [sizes[b, i, 0].item() for i in idx]
            mean = sum(w * x[b, i] for w, i in zip(weights, idx, strict=True)) / sum(weights)
            largest = max(x[b, i].norm().item() for i in idx)
            assert out[b, s].norm().item() == pytest.approx(largest, rel=1e-5)
            cosine = torch.dot(out[b, s], mean) / (out[b, s].norm() * mean.norm())
            assert cosine.item() == pytest.approx(1.0, abs=1e-5)
            assert new_sizes[b, s, 0].item() == sum(weights)


def test_mlerp_of_orthogonal_unit_vectors_has_norm_one():
    """Dividing by the destination's old norm instead of the merged vector's would give 0.707."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assignment = Assignment(dest=torch.tensor([[0, 0]]), n_out=1, merged=torch.tensor([[False, True]]))
    out, sizes = combine(x, None, assignment, mode="mlerp")
    assert out[0, 0].norm().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(out[0, 0], torch.full((2,), 2**-0.5))
    assert sizes.flatten().tolist() == [2.0]


def test_mlerp_eps_bounds_the_division_for_a_zero_mean():
    x = torch.tensor([[[1.0, 2.0], [-1.0, -2.0], [3.0, 0.0]]])
    assignment = Assignment(dest=torch.tensor([[0, 0, 1]]), n_out=2, merged=torch.tensor([[False, True, False]]))
    out, _ = combine(x, None, assignment, mode="mlerp", mlerp_eps=0.5)
    assert torch.isfinite(out).all() and out[0, 0].abs().max() == 0
    torch.testing.assert_close(out[0, 1], x[0, 2])  # a token alone keeps its value
    tiny = torch.tensor([[[0.1, 0.0], [0.1, 0.0]]])
    pair = Assignment(dest=torch.tensor([[0, 0]]), n_out=1, merged=torch.tensor([[False, True]]))
    clamped, _ = combine(tiny, None, pair, mode="mlerp", mlerp_eps=1.0)  # ||avg|| = 0.1 < eps
    torch.testing.assert_close(clamped[0, 0], torch.tensor([0.01, 0.0]))


@pytest.mark.parametrize("adds_size", [True, False])
def test_prune_keeps_the_destination_value_and_optionally_its_sources_size(adds_size):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 4, generator=g)
    sizes = torch.randint(1, 4, (2, 10, 1), generator=g).float()
    assignment = random_assignment(2, 10, 4, seed=3)
    out, new_sizes = combine(x, sizes, assignment, mode="prune", prune_adds_size=adds_size)
    for b in range(2):
        for s in range(4):
            idx = members(assignment, b, s)
            keeper = [i for i in idx if not assignment.merged[b, i]]
            assert len(keeper) == 1
            assert torch.equal(out[b, s], x[b, keeper[0]])
            want = sum(sizes[b, i, 0].item() for i in (idx if adds_size else keeper))
            assert new_sizes[b, s, 0].item() == want


def test_mlerp_and_prune_run_in_bfloat16_with_float32_sizes():
    x = torch.randn(1, 6, 8).to(torch.bfloat16)
    assignment = random_assignment(1, 6, 3, seed=5)
    for mode in ("mlerp", "prune"):
        out, sizes = combine(x, None, assignment, mode=mode)
        assert out.dtype == torch.bfloat16 and sizes.dtype == torch.float32 and torch.isfinite(out.float()).all()


def test_unknown_merge_mode_is_refused():
    assignment = Assignment(dest=torch.zeros(1, 2, dtype=torch.long), n_out=1)
    with pytest.raises(ConfigError, match="mode='lerp'.*mlerp"):
        combine(torch.randn(1, 2, 3), None, assignment, mode="lerp")


@pytest.mark.parametrize("mode", ["wavg", "mlerp"])
@pytest.mark.parametrize("with_sizes", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_matching_merges_as_its_assignment_does(with_sizes, dtype, mode):
    """`Matching` (representatives and sources) against the scatter over every token of the same
    assignment, and its `dest`/`merged` against a plain loop."""
    from tokenreduce.core.merge import Matching

    g = torch.Generator().manual_seed(0)
    batch, n, n_out = 3, 11, 6
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    reps, sources = perm[:, :n_out], perm[:, n_out:]
    slots = torch.randint(0, n_out, (batch, n - n_out), generator=g)
    matching = Matching(reps, sources, slots, n)
    for b in range(batch):
        for s in range(n_out):
            assert matching.dest[b, reps[b, s]] == s and not matching.merged[b, reps[b, s]]
        for j in range(n - n_out):
            assert matching.dest[b, sources[b, j]] == slots[b, j] and matching.merged[b, sources[b, j]]
    x = torch.randn(batch, n, 7, generator=g).to(dtype)
    sizes = torch.randint(1, 4, (batch, n, 1), generator=g).float() if with_sizes else None
    got, got_sizes = combine(x, sizes, matching, mode)
    want, want_sizes = combine(x, sizes, Assignment(dest=matching.dest, n_out=n_out, merged=matching.merged), mode)
    assert got.dtype == dtype and torch.equal(got_sizes, want_sizes)
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
