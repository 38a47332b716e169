"""`unmerge`: the tokens of a merge's slots given back to every token, against a plain loop."""

import pytest
import torch

from tokenreduce.core.matching import bipartite_soft_matching, ordered_bipartite_matching
from tokenreduce.core.merge import Assignment, Matching, combine, keep_assignment, unmerge
from tokenreduce.errors import ConfigError


def reference_unmerge(y, matching):
    """Per image, per token: its slot is where it is a representative, else its source's slot."""
    b, _, c = y.shape
    out = torch.empty(b, matching.num_tokens, c, dtype=y.dtype)
    for i in range(b):
        for t in range(matching.num_tokens):
            reps, sources = matching.reps[i].tolist(), matching.sources[i].tolist()
            slot = reps.index(t) if t in reps else matching.slots[i, sources.index(t)].item()
            out[i, t] = y[i, slot]
    return out


def matching_for(kind, batch, n, num_prefix, r, seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, 5, generator=g)
    if kind == "bipartite":
        return bipartite_soft_matching(metric, r, num_prefix)
    order = torch.stack([torch.randperm(n - num_prefix, generator=g) for _ in range(batch)])
    return ordered_bipartite_matching(metric, r, num_prefix, order, num_candidates=n - num_prefix - 2)


@pytest.mark.parametrize("kind", ["bipartite", "ordered"])
@pytest.mark.parametrize("batch, num_prefix, channels", [(1, 0, 1), (1, 1, 6), (3, 1, 4), (4, 5, 3)])
@pytest.mark.parametrize("mode", ["wavg", "mlerp", "prune"])
def test_every_token_takes_its_slots_value_in_input_order(kind, batch, num_prefix, channels, mode):
    n, r = num_prefix + 15, 5
    g = torch.Generator().manual_seed(batch * 10 + num_prefix)
    x = torch.randn(batch, n, channels, generator=g)
    sizes = torch.randint(1, 4, (batch, n, 1), generator=g).float()
    matching = matching_for(kind, batch, n, num_prefix, r, seed=num_prefix + channels)
    merged, _ = combine(x, sizes, matching, mode)
    out = unmerge(merged, matching)
    assert out.shape == x.shape and torch.equal(out, reference_unmerge(merged, matching))
    for i in range(batch):
        for s, t in enumerate(matching.reps[i].tolist()):  # a token that kept a slot gets that row
            assert torch.equal(out[i, t], merged[i, s])
        for t, s in zip(matching.sources[i].tolist(), matching.slots[i].tolist(), strict=True):
            assert torch.equal(out[i, t], merged[i, s])  # a source gets its destination's row
    if mode == "mlerp":  # MLERP rescales even a token alone in its slot (x / |x| * |x|, rounded)
        torch.testing.assert_close(out[:, :num_prefix], x[:, :num_prefix])
    else:
        assert torch.equal(out[:, :num_prefix], x[:, :num_prefix])


def test_unmerge_of_a_merge_of_equal_tokens_is_the_input():
    """Hand-built: prefix 0; slot 1 holds tokens 1, 4 (equal); slot 2 tokens 3, 2, 5 (equal)."""
    x = torch.tensor([[[9.0, -1.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0]]])
    matching = Matching(torch.tensor([[0, 1, 3]]), torch.tensor([[4, 2, 5]]), torch.tensor([[1, 2, 2]]), 6)
    assert matching.dest.tolist() == [[0, 1, 2, 2, 1, 2]]
    sizes = torch.tensor([[[1.0], [2.0], [1.0], [3.0], [1.0], [4.0]]])
    merged, new_sizes = combine(x, sizes, matching)
    assert merged.tolist() == [[[9.0, -1.0], [1.0, 2.0], [3.0, 4.0]]]
    assert new_sizes.flatten().tolist() == [1.0, 3.0, 8.0]
    assert torch.equal(unmerge(merged, matching), x)


def test_prefix_tokens_stay_first_and_the_order_is_the_input_order():
    n, num_prefix = 12, 3
    x = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(2, -1, 3).contiguous()
    metric = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(1))
    matching = bipartite_soft_matching(metric, 4, num_prefix)
    y = torch.arange(n - 4, dtype=torch.float32).view(1, -1, 1).expand(2, -1, 3) + 100  # slot s holds 100 + s
    out = unmerge(y, matching)
    assert out.shape == (2, n, 3)
    assert out[:, :num_prefix, 0].tolist() == [[100.0, 101.0, 102.0]] * 2
    assert torch.equal(out[..., 0], matching.dest.float() + 100)
    merged, _ = combine(x, None, matching)
    assert torch.equal(unmerge(merged, matching)[:, :num_prefix], x[:, :num_prefix])


def test_each_image_unmerges_by_its_own_matching():
    batch, n = 3, 10
    metric = torch.randn(batch, n, 4, generator=torch.Generator().manual_seed(2))
    matching = bipartite_soft_matching(metric, 4, 1)
    assert len({tuple(d) for d in matching.dest.tolist()}) == batch  # the images differ
    y = torch.randn(batch, n - 4, 5, generator=torch.Generator().manual_seed(3))
    out = unmerge(y, matching)
    assert torch.equal(out, reference_unmerge(y, matching))
    for i in range(batch):  # the same image alone gives the same rows
        alone = Matching(matching.reps[i:i + 1], matching.sources[i:i + 1], matching.slots[i:i + 1], n)
        assert torch.equal(unmerge(y[i:i + 1], alone), out[i:i + 1])


def test_a_function_between_merge_and_unmerge_reaches_every_member():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 14, 6, generator=g)
    sizes = torch.randint(1, 3, (2, 14, 1), generator=g).float()
    matching = matching_for("bipartite", 2, 14, 1, 6, seed=4)
    merged, _ = combine(x, sizes, matching)
    out = unmerge(merged * 2 + 1, matching)
    assert torch.equal(out, reference_unmerge(merged * 2 + 1, matching))
    assert torch.equal(out, unmerge(merged, matching) * 2 + 1)


def test_unmerge_is_differentiable_in_the_merged_tokens():
    matching = Matching(torch.tensor([[0, 2, 3], [1, 0, 4]]), torch.tensor([[1, 4], [2, 3]]),
                        torch.tensor([[2, 2], [1, 1]]), 5)
    y = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unmerge(t, matching), (y,))
    unmerge(y, matching).sum().backward()  # each slot's gradient counts its members
    assert y.grad[..., 0].tolist() == [[1.0, 1.0, 3.0], [1.0, 3.0, 1.0]]
    x = torch.randn(2, 5, 2, requires_grad=True)  # and on through the merge: each slot's mean,
    unmerge(combine(x, None, matching)[0], matching).sum().backward()  # counted once per member
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_a_fused_slot_is_shared_and_dropped_tokens_need_a_fill():
    keep = torch.tensor([[True, False, True, False, True], [False, True, True, True, False]])
    y = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(5))
    fused = keep_assignment(keep, fuse=True)
    out = unmerge(y, fused)
    assert torch.equal(out[0, [1, 3]], y[0, [3, 3]]) and torch.equal(out[1, [0, 4]], y[1, [3, 3]])
    dropped = keep_assignment(keep)
    with pytest.raises(ConfigError, match="drops 4 of 10 tokens.*fill="):
        unmerge(y[:, :3], dropped)
    fill = torch.full((2, 5, 3), -7.0)
    out = unmerge(y[:, :3], dropped, fill=fill)
    assert torch.equal(out[~keep], fill[~keep])
    assert torch.equal(out[0, [0, 2, 4]], y[0, :3]) and torch.equal(out[1, [1, 2, 3]], y[1, :3])
    whole = Assignment(dest=torch.tensor([[1, 0, 1]]), n_out=2)  # not marked represented, drops none
    assert torch.equal(unmerge(y[:1, :2], whole), y[:1, [1, 0, 1]])


def test_tokens_that_do_not_fit_the_matching_are_refused():
    matching = bipartite_soft_matching(torch.randn(2, 9, 4), 3, 1)
    with pytest.raises(ConfigError, match=r"shape \(2, 9, 5\) is invalid; allowed: \(2, 6, C\)"):
        unmerge(torch.randn(2, 9, 5), matching)  # the unmerged tokens, not the merged ones
    with pytest.raises(ConfigError, match=r"shape \(1, 6, 5\).*allowed: \(2, 6, C\)"):
        unmerge(torch.randn(1, 6, 5), matching)
    with pytest.raises(ConfigError, match=r"shape \(2, 6\) is invalid"):
        unmerge(torch.randn(2, 6), matching)
    dropped = keep_assignment(torch.tensor([[True, False, True]]))
    with pytest.raises(ConfigError, match=r"fill of shape \(1, 2, 5\).*allowed: \(1, 3, 5\)"):
        unmerge(torch.randn(1, 2, 5), dropped, fill=torch.zeros(1, 2, 5))


def test_empty_batch_and_low_precision_keep_shape_and_dtype():
    matching = bipartite_soft_matching(torch.randn(0, 7, 4), 2, 1)
    assert unmerge(torch.randn(0, 5, 3), matching).shape == (0, 7, 3)
    matching = bipartite_soft_matching(torch.randn(2, 7, 4), 2, 1)
    y = torch.randn(2, 5, 3).to(torch.bfloat16)
    out = unmerge(y, matching)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference_unmerge(y, matching))
