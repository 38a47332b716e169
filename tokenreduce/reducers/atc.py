"""ATC: agglomerative token clustering (Haurum et al., ECCV 2024, arXiv 2409.11923)."""

from __future__ import annotations

from torch import Tensor

from tokenreduce.core.clustering import LINKAGES, agglomerative_clustering, clustering_macs, leave_one
from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import KEEP_RATIO, KEYS, REMOVAL_COUNT, Signals, TokenReducer, register_reducer


@register_reducer("atc")
class ATC(TokenReducer):
    """Cluster the non-prefix tokens bottom-up on the cosine distance of their keys until the
    layer's count remains; every cluster becomes its size-weighted mean.

    r:            clusters joined (tokens removed) per layer: an int or a per-layer list
    ratio:        keep this fraction of the non-prefix tokens per reducing layer instead
    layers:       only these layers (0-based) reduce; the paper's keep-rate protocol is
                  ratio=..., layers=[3, 6, 9] on DeiT
    linkage:      "average" (the paper's best), "complete" or "single"
    prop_attn:    proportional attention (log size added to the attention logits)
    trace_source: keep the map from input patches to merged tokens
    """

    needs = frozenset({KEYS})
    strength = (KEEP_RATIO, REMOVAL_COUNT)
    cap = staticmethod(leave_one)

    def __init__(self, r: int | list[int] = 0, ratio: float | None = None, layers: list[int] | None = None,
                 linkage: str = "average", prop_attn: bool = True, trace_source: bool = False):
        if linkage not in LINKAGES:
            raise ConfigError(f"{self.name}: linkage={linkage!r} is invalid; allowed: {', '.join(map(repr, LINKAGES))}")
        super().__init__(Schedule(r=r, ratio=ratio, layers=layers, owner=self.name), prop_attn, trace_source)
        self.linkage = linkage

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        assignment = agglomerative_clustering(signals.keys, removal, state.num_prefix, self.linkage)
        state.add_macs(clustering_macs(state.num_prefix, x.shape[1], signals.keys.shape[-1]))
        return state.merge(x, assignment, "wavg")
