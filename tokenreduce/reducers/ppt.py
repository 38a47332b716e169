"""PPT: token pruning and pooling (Wu et al., arXiv 2310.01812)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.matching import bipartite_soft_matching, matching_macs
from tokenreduce.core.merge import Assignment, keep_assignment
from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import check_number
from tokenreduce.reducers.base import ATTN, KEYS, REMOVAL_COUNT, Signals, TokenReducer, register_reducer
from tokenreduce.reducers.pruning import require_class_token, top_tokens

DECISIONS = "ppt_pruned"  # ReductionState.extras: per reducing layer, [B] bool, True where the image pruned


def prunes(significance: Tensor, threshold: float) -> Tensor:
    """[B] bool: the images whose significance scores [B, T] vary more than `threshold` (variance,
    unbiased as torch.var): their attention singles out tokens, so pruning the inattentive ones
    is safe; the others pool."""
    return significance.float().var(dim=1) > threshold


@register_reducer("ppt")
class PPT(TokenReducer):
    """At each reducing layer, every image either prunes its `r` least significant tokens (by the
    class token's attention, mean over heads) or pools `r` pairs of similar tokens (ToMe's
    matching on the keys), by the variance of its significance scores against `threshold`.

    r:            tokens removed per reducing layer (at most half, as pooling is bipartite)
    layers:       the reducing layers (0-based); the reference evaluates r=50 at 3, 6, 9 on DeiT-S
    threshold:    variance above which an image prunes (the reference: 7e-5 off the shelf)
    prop_attn:    proportional attention (log size added to the attention logits)
    trace_source: keep the map from input patches to tokens (pruned patches map to none)
    """

    needs = frozenset({ATTN, KEYS})
    strength = (REMOVAL_COUNT,)

    def __init__(self, r: int | list[int] = 50, layers: tuple[int, ...] | None = (3, 6, 9), threshold: float = 7e-5,
                 prop_attn: bool = True, trace_source: bool = False):
        self.threshold = check_number(self.name, "threshold", threshold, low=0)
        super().__init__(Schedule(r=r, layers=layers, owner=self.name), prop_attn, trace_source)

    def check_model(self, info) -> None:
        super().check_model(info)
        require_class_token(self, info)

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        num_prefix, n_out = state.num_prefix, x.shape[1] - removal
        significance = signals.cls_attn()[:, num_prefix:]
        prune = prunes(significance, self.threshold)
        state.extras.setdefault(DECISIONS, []).append(prune)
        pruned = keep_assignment(top_tokens(significance, significance.shape[1] - removal, num_prefix), n_keep=n_out)
        pooled = bipartite_soft_matching(signals.keys, removal, num_prefix)
        state.add_macs(matching_macs(num_prefix, x.shape[1], signals.keys.shape[-1]))
        # one assignment, image by image: a pruning image drops its tokens (slot n_out), a pooling one merges
        rows = prune.unsqueeze(1)
        dest = torch.where(rows, pruned.dest, pooled.dest)
        merged = torch.where(rows, False, pooled.merged)
        return state.merge(x, Assignment(dest=dest, n_out=n_out, merged=merged), "wavg")
