"""Bipartite soft matching (ToMe) on a per-token metric, returning an `Assignment`.

`bipartite_soft_matching` splits the tokens by position, as ToMe does. `ordered_bipartite_matching`
runs the same matching on the tokens taken in a given order (e.g. by PiToMe's energy score), and can
pass the tail of that order through untouched (PiToMe's protected tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.merge import Matching, stable_argsort
from tokenreduce.errors import ConfigError

SPLITS = ("alternate", "halves")


def alternate_split(num_prefix: int, num_tokens: int) -> tuple[slice, slice]:
    """Slices of the non-prefix tokens in set A (even absolute positions) and set B (odd ones).

    Prefix tokens take no part, which is the same as giving them -inf scores in the full split.
    """
    a_first = num_prefix % 2  # non-prefix index j sits at absolute position num_prefix + j
    return slice(a_first, num_tokens, 2), slice(1 - a_first, num_tokens, 2)


def matching_macs(num_prefix: int, num_tokens: int, dim: int) -> int:
    """Multiply-accumulates of the A x B similarity matrix for one image."""
    a, b = alternate_split(num_prefix, num_tokens - num_prefix)
    n = num_tokens - num_prefix
    return len(range(n)[a]) * len(range(n)[b]) * dim


def _best_edges(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The core of ToMe's matching between normalised sets A [B, Na, d] and B [B, Nb, d].

    Every A token finds its most similar B token. Returns the A tokens ordered by that edge, best
    first [B, Na] (the caller merges the first r), and each A token's B partner [B, Na].
    """
    node_max, node_idx = torch.bmm(a, b.transpose(1, 2)).max(dim=-1)
    return stable_argsort(node_max, descending=True), node_idx


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> Matching | None:
    """Merge the `r` A tokens most similar to a B token into it.

    metric: [B, N, d], normalised here so dot products are cosine similarities.
    Output order: prefix tokens, unmerged A tokens in their original order, then B tokens.
    Returns None when nothing is merged.
    """
    # Written for the fewest operations (each costs its dispatch, which dominates at batch 1): A and
    # B are strided views of the normalised metric, and token indices are computed from positions.
    batch, n, _ = metric.shape
    sa, sb = alternate_split(num_prefix, n - num_prefix)
    num_a = len(range(n - num_prefix)[sa])
    r = min(r, num_a)
    if r <= 0 or num_a == n - num_prefix:
        return None
    a_start, b_start = num_prefix + sa.start, num_prefix + sb.start
    m = F.normalize(metric.float(), dim=-1)
    edges, partner = _best_edges(m[:, a_start::2], m[:, b_start::2])
    token = edges.mul(2).add_(a_start)  # the A tokens by edge, as token indices
    slots = partner.gather(1, edges[:, :r]).add_(num_prefix + num_a - r)
    reps = torch.cat([
        torch.arange(num_prefix, device=metric.device).expand(batch, -1),
        token[:, r:].sort(dim=-1).values,
        torch.arange(b_start, n, 2, device=metric.device).expand(batch, -1),
    ], dim=1)
    return Matching(reps, token[:, :r], slots, n)


def ordered_split_sizes(num_candidates: int) -> tuple[int, int]:
    """Sizes of sets A and B when `num_candidates` ordered tokens are split (A gets the odd one)."""
    return num_candidates - num_candidates // 2, num_candidates // 2


@torch.no_grad()
def ordered_bipartite_matching(
    metric: Tensor,
    r: int,
    num_prefix: int,
    order: Tensor,
    num_candidates: int | None = None,
    split: str = "alternate",
    normalized: bool = False,
) -> Matching | None:
    """ToMe's matching on the non-prefix tokens taken in `order` instead of by position.

    metric:         [B, N, d], normalised here unless `normalized` says its rows have unit norm already.
    order:          [B, N - num_prefix] long, a permutation of the non-prefix tokens (0 = first non-prefix).
    num_candidates: only the first this many tokens of `order` take part (default all); the rest are
                    kept unchanged (PiToMe's protected tokens).
    split:          "alternate": A = candidates 0, 2, 4..., B = 1, 3, 5... of the order;
                    "halves": A = the first half of the candidates, B = the second.
    r:              A tokens merged, those with the best edges; r >= |A| merges every A token.
    Output order: prefix tokens, kept tokens, unmerged A tokens, B tokens, each in `order`'s order.
    Returns None when nothing is merged.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid; allowed: {', '.join(SPLITS)}")
    batch, n, dim = metric.shape
    tokens = n - num_prefix
    if order.shape != (batch, tokens):
        raise ConfigError(f"order has shape {tuple(order.shape)}; allowed: ({batch}, {tokens}), one per non-prefix token")
    cands = tokens if num_candidates is None else min(num_candidates, tokens)
    num_a, num_b = ordered_split_sizes(cands)
    r = min(r, num_a)
    if r <= 0 or num_b == 0:
        return None
    token = order + num_prefix  # token indices, so that no index is offset twice
    kept_idx, cand_idx = token[:, cands:], token[:, :cands]
    if split == "alternate":
        a_idx, b_idx = cand_idx[:, 0::2], cand_idx[:, 1::2]
    else:
        a_idx, b_idx = cand_idx[:, :num_a], cand_idx[:, num_a:]
    m = metric if normalized else F.normalize(metric.float(), dim=-1)
    a = m.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, dim))
    b = m.gather(1, b_idx.unsqueeze(-1).expand(-1, -1, dim))
    edges, partner = _best_edges(a, b)
    first_a = num_prefix + tokens - cands
    slots = partner.gather(1, edges[:, :r]).add_(first_a + num_a - r)
    prefix = torch.arange(num_prefix, device=metric.device).expand(batch, -1)
    reps = torch.cat([prefix, kept_idx, a_idx.gather(1, edges[:, r:].sort(dim=-1).values), b_idx], dim=1)
    return Matching(reps, a_idx.gather(1, edges[:, :r]), slots, n)


def ordered_matching_macs(num_candidates: int, dim: int) -> int:
    """Multiply-accumulates of the A x B similarity matrix of `ordered_bipartite_matching`, one image."""
    num_a, num_b = ordered_split_sizes(num_candidates)
    return num_a * num_b * dim
