"""PiToMe: energy-score token merging (Tran et al., NeurIPS 2024)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.energy import KERNELS, energy_macs, energy_score, layer_margin
from tokenreduce.core.matching import ordered_bipartite_matching, ordered_matching_macs
from tokenreduce.core.merge import stable_argsort
from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, check_number
from tokenreduce.reducers.base import HALF_KEEP_RATIO, KEYS, Signals, TokenReducer, register_reducer

if TYPE_CHECKING:
    from tokenreduce.core.contract import ModelInfo

BIPARTITE = "bipartite"  # energy-ordered bipartite matching, ToMe's top-r edges
PROTECT = "protect"  # the 2r highest-energy tokens merge pairwise, the others are protected
TEXT = "text"  # the r highest-energy tokens merge into the next r, the others are protected (text models)
LAYER_MODES = (BIPARTITE, PROTECT, TEXT)
# Each layer mode as ordered_bipartite_matching runs it: (only the 2r highest-energy tokens are candidates,
# the others protected; how the candidates, in energy order, split into A and B)
MODE_MATCHING = {BIPARTITE: (False, "alternate"), PROTECT: (True, "alternate"), TEXT: (True, "halves")}
PRESETS = ("deit", "mae")
# Margin m0 by model family: the reference uses 0.75 for DeiT and MAE, 0.9 for AugReg and CLIP.
LOW_MARGIN_FAMILIES = ("deit", "mae")  # prefixes of a word of the model name (deit, deit3, .mae tag)
LOW_MARGIN, HIGH_MARGIN = 0.75, 0.9
DEFAULT_RATIO = 0.925


def family_margin(model_name: str, preset: str = "deit") -> float:
    """The reference margin m0 for a model: 0.75 for DeiT/MAE-style models, 0.9 for the others
    (AugReg, CLIP). A model is MAE-style when its name says so or `preset="mae"` is asked for."""
    words = model_name.lower().replace(".", "_").replace("-", "_").split("_")
    if preset == "mae" or any(word.startswith(family) for word in words for family in LOW_MARGIN_FAMILIES):
        return LOW_MARGIN
    return HIGH_MARGIN


def preset_layer_modes(preset: str, num_layers: int) -> list[str]:
    """"deit": energy-ordered bipartite in the first ceil(L/2) layers, protect after; "mae": reversed."""
    first, second = (BIPARTITE, PROTECT) if preset == "deit" else (PROTECT, BIPARTITE)
    half = math.ceil(num_layers / 2)
    return [first] * half + [second] * (num_layers - half)


@register_reducer("pitome")
class PiToMe(TokenReducer):
    """Merge the tokens in large clusters of similar tokens and protect the isolated ones.

    Each reducing layer scores every non-prefix token by its energy (the mean ELU of its cosine
    similarities to all tokens less a margin that shrinks with depth, or for text models a Gaussian
    kernel of them) and orders them high first.
    "protect" layers merge the 2r highest-energy tokens pairwise and leave the rest; "bipartite"
    layers run ToMe's matching on the energy-ordered sequence. The text-model variant of the paper is
    `energy="gaussian"` with "text" in every layer: the r highest-energy tokens merge into the next r.

    ratio:        keep this fraction of the non-prefix tokens in every layer (>= 0.5)
    r:            remove a fixed number per layer (an int or per-layer list) instead of a ratio
    margin:       m0 of the margin schedule m_l = m0 * (1 - l/L); None picks it by model family
                  (0.75 for DeiT/MAE-style, 0.9 for AugReg/CLIP-style)
    alpha:        ELU scale of the penalty for similarities below the margin
    energy:       the energy kernel: "elu" (vision models) or "gaussian" (text models),
                  mean_j exp(-0.5 * ((1 - S_ij) / sigma)^2) with sigma = 1 - m_l, which needs margin < 1
    preset:       layer modes: "deit" bipartite in the first ceil(L/2) layers, protect after;
                  "mae" the reverse (and m0 = 0.75 unless given)
    layer_modes:  explicit mode per layer ("bipartite", "protect" or "text"), overriding the preset;
                  "text" is protect with A = the r highest-energy tokens and B = the next r
    mode:         "wavg" size-weighted merge or "mean" plain mean
    prop_attn:    proportional attention; off by default as in the reference code, whose published
                  numbers were measured without it
    trace_source: keep the map from input patches to merged tokens
    """

    needs = frozenset({KEYS})
    strength = (HALF_KEEP_RATIO,)

    def __init__(
        self,
        ratio: float | None = DEFAULT_RATIO,
        r: int | list[int] | None = None,
        margin: float | None = None,
        alpha: float = 1.0,
        energy: str = "elu",
        preset: str = "deit",
        layer_modes: list[str] | None = None,
        mode: str = "wavg",
        prop_attn: bool = False,
        trace_source: bool = False,
    ):
        who = self.name
        if r is not None:
            if ratio != DEFAULT_RATIO and ratio is not None:
                Schedule(ratio=ratio, owner=who)  # a ratio out of range is named as such, before "not both"
                raise ConfigError(f"{who}: give either r={r!r} or ratio={ratio!r}, not both")
            ratio = None
        elif ratio is None:
            raise ConfigError(f"{who}: ratio=None needs r; allowed: a keep ratio in [0.5, 1] or an r")
        schedule = Schedule(r=r, ratio=ratio, owner=who)
        if ratio is not None and ratio < 0.5:
            raise ConfigError(
                f"{who}: ratio={ratio!r} is invalid; allowed: a keep ratio in [0.5, 1] "
                "(protect mode merges the 2r highest-energy tokens, which needs 2r <= tokens)"
            )
        if margin is not None:
            check_number(who, "margin", margin, low=0.0, high=1.0, finite=True)
        check_number(who, "alpha", alpha, low=0.0, finite=True)
        if energy not in KERNELS:
            allowed = ", ".join(repr(k) for k in KERNELS)
            raise ConfigError(f"{who}: energy={energy!r} is invalid; allowed: {allowed}")
        if energy == "gaussian" and margin is not None and margin >= 1:
            raise ConfigError(
                f"{who}: margin={margin!r} is invalid with energy='gaussian', whose width sigma = 1 - margin "
                "must be positive; allowed: a margin in [0, 1)"
            )
        if preset not in PRESETS:
            raise ConfigError(f"{who}: preset={preset!r} is invalid; allowed: {', '.join(PRESETS)}")
        if layer_modes is not None:
            if isinstance(layer_modes, str) or not all(m in LAYER_MODES for m in layer_modes):
                raise ConfigError(
                    f"{who}: layer_modes={layer_modes!r} is invalid; allowed: a list with one of "
                    f"{', '.join(repr(m) for m in LAYER_MODES)} per layer"
                )
            layer_modes = list(layer_modes)
        if mode not in ("wavg", "mean"):
            raise ConfigError(f"{who}: mode={mode!r} is invalid; allowed: 'wavg', 'mean'")
        super().__init__(schedule, prop_attn=prop_attn, trace_source=trace_source)
        self.margin = margin
        self.alpha = float(alpha)
        self.energy = energy
        self.preset = preset
        self.layer_modes = layer_modes
        self.mode = mode
        self.resolved_margin = margin  # set from the model family by check_model when margin is None

    def check_model(self, info: ModelInfo) -> None:
        super().check_model(info)
        if self.layer_modes is not None and len(self.layer_modes) != info.depth:
            raise ConfigError(
                f"{self.name}: layer_modes has {len(self.layer_modes)} entries but the model has "
                f"{info.depth} blocks; allowed: exactly {info.depth} entries"
            )
        if self.margin is None:
            self.resolved_margin = family_margin(info.name, self.preset)

    def params(self) -> dict:
        params = super().params()
        if params["r"] is not None:
            params["ratio"] = None
        return params

    def layer_mode(self, layer: int, num_layers: int) -> str:
        if self.layer_modes is not None:
            return self.layer_modes[layer]
        return preset_layer_modes(self.preset, num_layers)[layer]

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        if self.resolved_margin is None:
            raise ConfigError(f"{self.name}: margin=None is chosen from the model; use tokenreduce.apply(model, ...)")
        num_layers, num_prefix = len(state.removals), state.num_prefix
        keys = signals.keys
        tokens, dim = keys.shape[1] - num_prefix, keys.shape[-1]
        margin = layer_margin(self.resolved_margin, layer, num_layers)
        with torch.no_grad():  # normalised once for the energy and the matching
            unit = F.normalize(keys.float(), dim=-1)
            energy = energy_score(unit[:, num_prefix:], margin, self.alpha, kernel=self.energy, normalized=True)
            order = stable_argsort(energy, descending=True)
        protect, split = MODE_MATCHING[self.layer_mode(layer, num_layers)]
        candidates = 2 * removal if protect else tokens
        assignment = ordered_bipartite_matching(
            unit, removal, num_prefix, order, num_candidates=candidates, split=split, normalized=True
        )
        state.add_macs(energy_macs(tokens, dim) + ordered_matching_macs(min(candidates, tokens), dim))
        return state.merge(x, assignment, self.mode)
