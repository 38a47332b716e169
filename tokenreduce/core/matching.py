"""Bipartite soft matching (ToMe) on a per-token metric, returning an `Assignment`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.merge import Assignment


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


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> Assignment | None:
    """Merge the `r` A tokens most similar to a B token into it.

    metric: [B, N, d], normalised here so dot products are cosine similarities.
    Output order: prefix tokens, unmerged A tokens in their original order, then B tokens.
    Returns None when nothing is merged.
    """
    batch, n, _ = metric.shape
    sa, sb = alternate_split(num_prefix, n - num_prefix)
    m = F.normalize(metric[:, num_prefix:].float(), dim=-1)
    a, b = m[:, sa], m[:, sb]
    r = min(r, a.shape[1])
    if r <= 0 or b.shape[1] == 0:
        return None
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    src = node_max.argsort(dim=-1, descending=True, stable=True)[:, :r]
    merged_a = torch.zeros_like(node_max, dtype=torch.bool).scatter_(1, src, True)
    n_unmerged = a.shape[1] - r
    first_b = num_prefix + n_unmerged
    dest_a = torch.where(merged_a, first_b + node_idx, num_prefix + (~merged_a).cumsum(1) - 1)
    dest_b = first_b + torch.arange(b.shape[1], device=metric.device).expand(batch, -1)

    dest = torch.empty(batch, n, dtype=torch.long, device=metric.device)
    dest[:, :num_prefix] = torch.arange(num_prefix, device=metric.device)
    dest[:, num_prefix:][:, sa] = dest_a
    dest[:, num_prefix:][:, sb] = dest_b
    merged = torch.zeros(batch, n, dtype=torch.bool, device=metric.device)
    merged[:, num_prefix:][:, sa] = merged_a
    return Assignment(dest=dest, n_out=n - r, merged=merged)
