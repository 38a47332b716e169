"""Zero-TPrune: zero-shot token pruning on the attention graph (Wang, Dedhia, Jha, CVPR 2024,
arXiv 2305.17328).

At each reducing block, between the attention residual and the MLP:

- I-stage: every head's attention matrix is a weighted directed graph; a weighted PageRank
  (`wpr_scores`) gives each token the attention it receives, weighted by the importance of the
  tokens that attend to it. Heads whose score distribution has a variance outside a range are left
  out, the others are combined by their root mean square (`head_importance`).
- S-stage: the non-prefix tokens are ranked by importance and split into a pruning group A and a
  kept group B; the A tokens most similar (cosine, on the keys) to some B token are dropped
  (`select_kept`), so near-duplicates go before unique tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.merge import keep_assignment, stable_argsort
from tokenreduce.core.schedule import Schedule, half_cap
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, check_number, check_numbers, is_list
from tokenreduce.reducers.base import ATTN, KEYS, REMOVAL_COUNT, Signals, TokenReducer, register_reducer

PARTITIONS = ("sequential", "alternate")
EDGE_LAYERS = 3  # "first three" and "last three" layers of the paper's iteration counts


def layer_iterations(iterations: tuple[int, int, int], layer: int, depth: int) -> int:
    """WPR iterations at `layer` of a `depth`-block model: iterations[0] in the first three layers,
    iterations[2] in the last three, iterations[1] in between (the first three win where they overlap)."""
    if layer < EDGE_LAYERS:
        return iterations[0]
    if layer >= depth - EDGE_LAYERS:
        return iterations[2]
    return iterations[1]


@torch.no_grad()
def wpr_scores(attn: Tensor, iterations: int) -> Tensor:
    """Weighted PageRank of every head's attention graph: [B, H, N, N] (rows = queries, summing to
    1) -> [B, H, N] scores, starting from 1/N and iterating s <- A^T s `iterations` times.

    A row-stochastic A keeps the scores summing to 1.
    """
    n = attn.shape[-1]
    a = attn.float()
    s = a.new_full((*attn.shape[:-2], 1, n), 1.0 / n)
    for _ in range(iterations):
        s = s @ a  # s_i <- sum_j s_j A[j, i]
    return s.squeeze(-2)


@torch.no_grad()
def kept_heads(scores: Tensor, head_variance: tuple[float, float] | None) -> Tensor:
    """[B, H] bool: the heads whose scores [B, H, N], scaled to mean 1 (N * s), have a variance
    (population, over all N tokens) within `head_variance`; every head of an image with none
    in range, and every head when `head_variance` is None."""
    if head_variance is None:
        return torch.ones(scores.shape[:2], dtype=torch.bool, device=scores.device)
    low, high = head_variance
    variance = (scores.float() * scores.shape[-1]).var(dim=-1, correction=0)
    keep = (variance >= low) & (variance <= high)
    return keep | ~keep.any(dim=1, keepdim=True)


@torch.no_grad()
def head_importance(scores: Tensor, head_variance: tuple[float, float] | None) -> Tensor:
    """[B, N] importance: the root mean square over the heads `kept_heads` keeps of their scores [B, H, N]."""
    keep = kept_heads(scores, head_variance).float().unsqueeze(-1)
    squares = (scores.float().square() * keep).sum(dim=1)
    return (squares / keep.sum(dim=1)).sqrt()


def importance_count(removal: int, importance_share: float) -> int:
    """Tokens removed by importance alone: `importance_share` of `removal`, rounded down (a product
    that float arithmetic puts a hair under an integer counts as that integer)."""
    return math.floor(round(importance_share * removal, 9))


def group_sizes(tokens: int) -> tuple[int, int]:
    """Sizes of groups A (pruning candidates) and B of `tokens` ranked tokens; B gets the odd one."""
    return tokens // 2, tokens - tokens // 2


def split_ranked(ranked: Tensor, partition: str) -> tuple[Tensor, Tensor]:
    """Groups A and B of the tokens `ranked` [B, T] (most important first), each in ranking order.

    sequential: B = the first (more important) half, A = the rest; alternate: B = ranks 0, 2, 4...,
    A = ranks 1, 3, 5...
    """
    if partition == "alternate":
        return ranked[:, 1::2], ranked[:, 0::2]
    _, num_b = group_sizes(ranked.shape[1])
    return ranked[:, num_b:], ranked[:, :num_b]


@torch.no_grad()
def select_kept(importance: Tensor, metric: Tensor, removal: int, importance_share: float = 0.0,
                partition: str = "sequential") -> Tensor:
    """[B, T] bool, the tokens that stay: `removal` of the T tokens are dropped.

    importance: [B, T] I-stage scores; metric: [B, T, d], compared by cosine similarity.
    First `importance_count(removal, importance_share)` tokens of lowest importance are dropped;
    the rest of `removal` are the A tokens (of the remaining ones, split by `split_ranked`) with the
    highest similarity to their most similar B token. Ties keep the ranking's order (a stable sort,
    most important first; of equal similarities the A token ranked first goes first).
    """
    batch, tokens = importance.shape
    ranked = stable_argsort(importance, descending=True)
    by_importance = importance_count(removal, importance_share)
    remaining = tokens - by_importance
    dropped = [ranked[:, remaining:]]
    by_similarity = removal - by_importance
    if by_similarity > 0:
        a_idx, b_idx = split_ranked(ranked[:, :remaining], partition)
        dim = metric.shape[-1]
        m = F.normalize(metric.float(), dim=-1)
        a = m.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, dim))
        b = m.gather(1, b_idx.unsqueeze(-1).expand(-1, -1, dim))
        best = (a @ b.transpose(-1, -2)).amax(dim=-1)
        first = stable_argsort(best, descending=True)[:, :by_similarity]
        dropped.append(a_idx.gather(1, first))
    keep = torch.ones(batch, tokens, dtype=torch.bool, device=importance.device)
    return keep.scatter(1, torch.cat(dropped, dim=1), False)


def similarity_macs(tokens: int, removal: int, importance_share: float, dim: int) -> int:
    """Multiply-accumulates of the A x B similarity matrix of `select_kept` for one image (none
    when the S-stage removes nothing)."""
    by_importance = importance_count(removal, importance_share)
    if removal - by_importance <= 0:
        return 0
    num_a, num_b = group_sizes(tokens - by_importance)
    return num_a * num_b * dim


@register_reducer("zerotprune")
class ZeroTPrune(TokenReducer):
    """Drop `r` tokens per reducing layer, chosen by importance (weighted PageRank on the attention
    graph) and similarity (near-duplicates of more important tokens go first).

    r:                tokens removed per reducing layer (an int or a per-layer list), at most half;
                      11 in every layer is about the published 34.7% fewer MACs on DeiT-S
    layers:           the reducing layers (0-based); None for every layer
    iterations:       WPR iterations in (the first three layers, the middle layers, the last three)
    head_variance:    (low, high): heads whose scores, scaled to mean 1, vary outside it are left out
                      of the aggregation; None keeps every head
    partition:        "sequential" (A = the less important half) or "alternate" (along the ranking)
    importance_share: fraction of r (rounded down) removed by lowest importance alone, before the S-stage
    prop_attn:        proportional attention (pruned tokens add no size, so it changes nothing alone)
    trace_source:     keep the map from input patches to tokens (pruned patches map to none)
    """

    needs = frozenset({ATTN, KEYS})
    strength = (REMOVAL_COUNT,)
    cap = staticmethod(half_cap)  # group A holds at most half the tokens

    def __init__(self, r: int | list[int] = 11, layers: tuple[int, ...] | None = None,
                 iterations: tuple[int, int, int] = (30, 5, 1),
                 head_variance: tuple[float, float] | None = (0.01, 0.7), partition: str = "sequential",
                 importance_share: float = 0.0, prop_attn: bool = False, trace_source: bool = False):
        who = self.name
        if not (is_list(iterations) and len(iterations) == 3):
            raise ConfigError(f"{who}: iterations={iterations!r} is invalid; allowed: three integers >= 1 "
                              "(the first three layers, the middle layers, the last three layers)")
        self.iterations = tuple(check_numbers(who, "iterations", iterations, low=1, integer=True))
        if head_variance is not None:
            if not (is_list(head_variance) and len(head_variance) == 2):
                raise ConfigError(f"{who}: head_variance={head_variance!r} is invalid; allowed: (low, high) "
                                  "with 0 <= low <= high, or None")
            low, high = check_numbers(who, "head_variance", head_variance, low=0)
            if low > high:
                raise ConfigError(f"{who}: head_variance={head_variance!r} is invalid; allowed: (low, high) "
                                  "with 0 <= low <= high, or None")
            head_variance = (low, high)
        self.head_variance = head_variance
        if partition not in PARTITIONS:
            raise ConfigError(f"{who}: partition={partition!r} is invalid; "
                              f"allowed: {', '.join(map(repr, PARTITIONS))}")
        self.partition = partition
        self.importance_share = check_number(who, "importance_share", importance_share, low=0, high=1)
        super().__init__(Schedule(r=r, layers=layers, owner=who), prop_attn, trace_source)

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        num_prefix, (batch, n, _) = state.num_prefix, x.shape
        iterations = layer_iterations(self.iterations, layer, len(state.removals))
        heads = signals.attn.shape[1]
        scores = wpr_scores(signals.attn, iterations)
        importance = head_importance(scores, self.head_variance)[:, num_prefix:]
        keep = select_kept(importance, signals.keys[:, num_prefix:], removal, self.importance_share,
                           self.partition)
        dim = signals.keys.shape[-1]
        state.add_macs(iterations * heads * n * n
                       + similarity_macs(n - num_prefix, removal, self.importance_share, dim))
        prefix = torch.ones(batch, num_prefix, dtype=torch.bool, device=x.device)
        return state.merge(x, keep_assignment(torch.cat([prefix, keep], dim=1), n_keep=n - removal), "prune")
