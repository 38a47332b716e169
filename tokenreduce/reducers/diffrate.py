"""DiffRate: differentiable compression rate (Chen et al., ICCV 2023, arXiv 2305.17997).

This is the fixed-schedule reducer: every layer first prunes, then merges, by counts that a
search has chosen (`tokenreduce.search.diffrate.diffrate_search`, or the published schedules).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.merge import Assignment, stable_argsort
from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, check_number, check_numbers, is_list
from tokenreduce.reducers.base import ATTN, KEYS, Signals, TokenReducer, register_reducer
from tokenreduce.reducers.pruning import require_class_token

# DiffRate's published schedule for DeiT-S at 2.9 GFLOPs (the reference repository's
# compression_rate.json, kept-token counts with the class token) as tokens removed per layer
DEIT_S_PRUNE = (0, 1, 4, 8, 6, 2, 4, 4, 8, 10, 6, 53)
DEIT_S_MERGE = (0, 2, 14, 12, 9, 6, 8, 10, 11, 14, 2, 0)


def _counts(who: str, name: str, value) -> int | list[int]:
    """A removal count for every layer (an int) or per layer (a list, padded with 0)."""
    if is_list(value):
        return check_numbers(who, name, value, low=0, integer=True)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{who}: {name}={value!r} is invalid; allowed: an integer >= 0 (every layer) "
                          f"or a list of integers >= 0 (one per layer)")
    return check_number(who, name, value, low=0, integer=True)


def _at(counts: int | list[int], layer: int) -> int:
    if isinstance(counts, int):
        return counts
    return counts[layer] if layer < len(counts) else 0


def split_counts(prune: int, merge: int, tokens: int) -> tuple[int, int]:
    """(pruned, merged) when a layer asks for `prune` and `merge` of `tokens` non-prefix tokens:
    pruning keeps at least one token, merging removes at most half of what pruning left."""
    pruned = max(0, min(prune, tokens - 1))
    merged = max(0, min(merge, (tokens - pruned) // 2))
    return pruned, merged


@register_reducer("diffrate")
class DiffRate(TokenReducer):
    """Between the attention residual and the MLP of every layer: rank the non-prefix tokens by the
    attention the class token pays them (mean over heads), drop the `prune[l]` least important,
    then merge the `merge[l]` least important of the rest, each into the most similar (cosine of
    the head-averaged keys) of the more important ones, by size-weighted mean.

    prune:        tokens pruned per layer: an int for every layer, or a per-layer list (padded with 0);
                  at most all but one of the non-prefix tokens
    merge:        tokens merged per layer, after pruning, likewise; at most half of what pruning left
    prop_attn:    proportional attention (log size added to the attention logits)
    trace_source: keep the map from input patches to tokens (pruned patches map to none)
    """

    needs = frozenset({ATTN, KEYS})
    strength = ()  # driven by searched per-layer schedules; no single parameter sets its cost

    def __init__(self, prune: int | list[int] = DEIT_S_PRUNE, merge: int | list[int] = DEIT_S_MERGE,
                 prop_attn: bool = True, trace_source: bool = False):
        self.prune = _counts(self.name, "prune", prune)
        self.merge = _counts(self.name, "merge", merge)
        if isinstance(self.prune, int) and isinstance(self.merge, int):
            total = self.prune + self.merge
        else:
            depth = max(len(c) for c in (self.prune, self.merge) if isinstance(c, list))
            total = [_at(self.prune, i) + _at(self.merge, i) for i in range(depth)]
        # what the layers ask for in all (the caps are applied by `removal_at`)
        super().__init__(Schedule(r=total, owner=self.name), prop_attn, trace_source)

    def check_model(self, info) -> None:
        require_class_token(self, info)
        for name, counts in (("prune", self.prune), ("merge", self.merge)):
            if isinstance(counts, list) and len(counts) > info.depth:
                raise ConfigError(f"{self.name}: {name} has {len(counts)} entries but the model has {info.depth} "
                                  f"blocks; allowed: at most {info.depth} entries")

    def split(self, layer: int, tokens: int) -> tuple[int, int]:
        """(pruned, merged) at `layer` when `tokens` non-prefix tokens enter it."""
        return split_counts(_at(self.prune, layer), _at(self.merge, layer), tokens)

    def removal_at(self, layer: int, num_layers: int, tokens: int) -> int:
        return sum(self.split(layer, tokens))

    def removal_counts(self, num_layers: int, num_tokens: int) -> list[int]:
        counts, tokens = [], num_tokens
        for layer in range(num_layers):
            counts.append(self.removal_at(layer, num_layers, tokens))
            tokens -= counts[-1]
        return counts

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        prefix, tokens = state.num_prefix, x.shape[1] - state.num_prefix
        pruned, merged = self.split(layer, tokens)
        assignment = prune_then_merge(signals.cls_attn()[:, prefix:], signals.keys[:, prefix:], prefix, pruned, merged)
        if merged:
            state.add_macs(merged * (tokens - pruned - merged) * signals.keys.shape[-1])
        return state.merge(x, assignment, "wavg" if merged else "prune")


def prune_then_merge(importance: Tensor, keys: Tensor, num_prefix: int, pruned: int, merged: int) -> Assignment:
    """The assignment of one DiffRate layer.

    importance: [B, T] the class token's attention to the non-prefix tokens; keys: [B, T, d] theirs.
    By importance (ties: the earlier token first), the last `pruned` tokens are dropped, the
    `merged` before them are the sources, and the remaining most important ones are the
    destinations: each source goes to the destination whose key is most similar (cosine).
    Output: the prefix tokens, then the destinations in their original order.
    """
    batch, tokens = importance.shape
    kept = tokens - pruned - merged
    order = stable_argsort(importance, descending=True)
    dests = order[:, :kept]
    is_dest = torch.zeros_like(importance, dtype=torch.bool).scatter_(1, dests, True)
    slot = num_prefix + is_dest.long().cumsum(dim=1) - 1
    n_out = num_prefix + kept
    dest = torch.where(is_dest, slot, torch.full_like(slot, n_out))
    sources = None
    if merged:
        src = order[:, kept : kept + merged]
        metric = F.normalize(keys.float(), dim=-1)
        dim = metric.shape[-1]
        a = metric.gather(1, src.unsqueeze(-1).expand(-1, -1, dim))
        b = metric.gather(1, dests.unsqueeze(-1).expand(-1, -1, dim))
        partner = dests.gather(1, (a @ b.transpose(-1, -2)).argmax(dim=-1))
        dest = dest.scatter(1, src, slot.gather(1, partner))
        sources = torch.zeros_like(is_dest).scatter_(1, src, True)
    prefix = torch.arange(num_prefix, device=dest.device).expand(batch, -1)
    dest = torch.cat([prefix, dest], dim=1)
    if sources is not None:
        sources = torch.cat([torch.zeros_like(prefix, dtype=torch.bool), sources], dim=1)
    return Assignment(dest=dest, n_out=n_out, merged=sources)
