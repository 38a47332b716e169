"""ToMe: bipartite soft matching (Bolya et al., ICLR 2023)."""

from __future__ import annotations

from torch import Tensor

from tokenreduce.core.matching import bipartite_soft_matching, matching_macs
from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import (
    HALF_KEEP_RATIO,
    KEYS,
    REMOVAL_COUNT,
    Signals,
    TokenReducer,
    register_reducer,
)


@register_reducer("tome")
class ToMe(TokenReducer):
    """Merge the `r` most similar A->B token pairs per layer (alternating split on head-averaged keys).

    r:           tokens removed per layer: an int, a per-layer list, or (r, inflect)
    inflect:     ToMe's schedule shape; -1 decreases linearly from 2r to 0, 0 is constant
    ratio:       keep this fraction of the non-prefix tokens per layer instead of a fixed r
    layers:      only these layers (0-based) reduce
    prop_attn:   proportional attention (log size added to the attention logits)
    trace_source: keep the map from input patches to merged tokens
    mode:        "wavg" size-weighted mean (the paper) or "mean" plain mean
    """

    needs = frozenset({KEYS})
    strength = (HALF_KEEP_RATIO, REMOVAL_COUNT)

    def __init__(
        self,
        r: int | list[int] | tuple[int, float] = 0,
        inflect: float | None = None,
        ratio: float | None = None,
        layers: list[int] | None = None,
        prop_attn: bool = True,
        trace_source: bool = False,
        mode: str = "wavg",
    ):
        if mode not in ("wavg", "mean"):
            raise ConfigError(f"{self.name}: mode={mode!r} is invalid; allowed: 'wavg', 'mean'")
        schedule = Schedule(r=r, inflect=inflect, ratio=ratio, layers=layers, owner=self.name)
        super().__init__(schedule, prop_attn=prop_attn, trace_source=trace_source)
        self.mode = mode

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        assignment = bipartite_soft_matching(signals.keys, removal, state.num_prefix)
        state.add_macs(matching_macs(state.num_prefix, x.shape[1], signals.keys.shape[-1]))
        return state.merge(x, assignment, self.mode)
