"""ToFu: token fusion, pruning early and norm-preserving merging late (Kim et al., WACV 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from tokenreduce.core.matching import bipartite_soft_matching, matching_macs
from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, check_flag, check_number
from tokenreduce.reducers.base import (
    HALF_KEEP_RATIO,
    KEYS,
    REMOVAL_COUNT,
    Signals,
    TokenReducer,
    register_reducer,
)

if TYPE_CHECKING:
    from tokenreduce.core.contract import ModelInfo


@register_reducer("tofu")
class ToFu(TokenReducer):
    """ToMe's matching, with the matched pairs combined by layer: pruned early, MLERP-merged late.

    In a prune layer the destination keeps its value and the source is dropped; in the others the
    group becomes the direction of its size-weighted mean with the norm of its largest member (MLERP),
    which keeps the norm distribution that averaging shrinks.

    r:               tokens removed per layer: an int, a per-layer list, or (r, inflect)
    inflect:         ToMe's schedule shape; -1 decreases linearly from 2r to 0, 0 is constant
    ratio:           keep this fraction of the non-prefix tokens per layer instead of a fixed r
    layers:          only these layers (0-based) reduce
    prune_layers:    layers that prune inside the matching; None means l <= L // 2
    prune_adds_size: whether a pruned source's size is added to its destination (keeps sizes summing
                     to the patch count, so proportional attention and pooling weigh it)
    mlerp_eps:       the smallest norm MLERP divides by
    prop_attn:       proportional attention (log size added to the attention logits)
    trace_source:    keep the map from input patches to merged tokens
    """

    needs = frozenset({KEYS})
    strength = (HALF_KEEP_RATIO, REMOVAL_COUNT)

    def __init__(
        self,
        r: int | list[int] | tuple[int, float] = 0,
        inflect: float | None = None,
        ratio: float | None = None,
        layers: list[int] | None = None,
        prune_layers: list[int] | None = None,
        prune_adds_size: bool = True,
        mlerp_eps: float = 1e-6,
        prop_attn: bool = True,
        trace_source: bool = False,
    ):
        who = self.name
        schedule = Schedule(r=r, inflect=inflect, ratio=ratio, layers=layers, owner=who)
        if prune_layers is not None:
            if isinstance(prune_layers, (str, bytes)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in prune_layers
            ):
                raise ConfigError(f"{who}: prune_layers={prune_layers!r} is invalid; allowed: a list of layer indices >= 0")
            prune_layers = sorted(set(prune_layers))
        check_flag(who, "prune_adds_size", prune_adds_size)
        check_number(who, "mlerp_eps", mlerp_eps, low=0, low_open=True, finite=True)
        super().__init__(schedule, prop_attn=prop_attn, trace_source=trace_source)
        self.prune_layers = prune_layers
        self.prune_adds_size = prune_adds_size
        self.mlerp_eps = float(mlerp_eps)

    def check_model(self, info: ModelInfo) -> None:
        super().check_model(info)
        if self.prune_layers and self.prune_layers[-1] >= info.depth:
            raise ConfigError(
                f"{self.name}: prune_layers={self.prune_layers} reaches beyond the model's {info.depth} blocks; "
                f"allowed: 0 .. {info.depth - 1}"
            )

    def prunes_at(self, layer: int, num_layers: int) -> bool:
        """By default layers `l <= L // 2` prune inside the matching; the later ones merge with MLERP."""
        if self.prune_layers is None:
            return layer <= num_layers // 2
        return layer in self.prune_layers

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        assignment = bipartite_soft_matching(signals.keys, removal, state.num_prefix)
        state.add_macs(matching_macs(state.num_prefix, x.shape[1], signals.keys.shape[-1]))
        if self.prunes_at(layer, len(state.removals)):
            return state.merge(x, assignment, "prune", prune_adds_size=self.prune_adds_size)
        return state.merge(x, assignment, "mlerp", mlerp_eps=self.mlerp_eps)
