"""Reduction schedules: how many tokens each layer removes.

Every schedule form is resolved to one list of per-layer removal counts before the forward pass,
by walking the layers with the number of non-prefix tokens that will actually enter each one, so
caps and keep ratios see the realised counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenreduce.errors import ConfigError, check_number, check_numbers, is_list

Cap = Callable[[int], int]


def half_cap(tokens: int) -> int:
    """Bipartite methods can remove at most half of the non-prefix tokens in one layer."""
    return tokens // 2


def no_cap(tokens: int) -> int:
    """Pruning methods may remove any number of tokens; their keep ratio bounds them."""
    return tokens


def keep_ratio_removal(tokens: int, ratio: float) -> int:
    """Tokens removed when keeping `ratio` of `tokens` (PiToMe/ToFu/EViT rounding)."""
    return math.floor(tokens - tokens * ratio)


@dataclass(frozen=True)
class Schedule:
    """One reduction schedule, validated on construction.

    Forms (exactly one of `r` or `ratio`):
      - ``r=8``: remove 8 tokens in every reducing layer;
      - ``r=[8, 8, 4]``: per-layer counts, a shorter list is padded with 0;
      - ``r=16, inflect=-1`` (or ``r=(16, -1)``): ToMe's linearly changing schedule;
      - ``ratio=0.9``: keep 90% of the non-prefix tokens in every reducing layer;
      - ``ratio=0.7, layers=[3, 6, 9]``: staged keep rate at chosen layers;
      - ``r=0.35`` with ``fractional=True``: remove ``int(T * 0.35)`` of the T non-prefix tokens
        entering each reducing layer (MCTF's convention for r < 1).
    `layers` restricts any form to the listed layers (0-based); the others remove nothing (with a
    per-layer list, its entries at the other layers are ignored).
    """

    r: int | list[int] | tuple[int, float] | None = None
    inflect: float | None = None
    ratio: float | None = None
    layers: tuple[int, ...] | None = None
    owner: str = "schedule"
    fractional: bool = False

    def __post_init__(self):
        who = self.owner
        r, inflect = self.r, self.inflect
        if r == 0 and self.ratio is not None:  # r's default (0) is "not given" when a ratio is
            r = None
        if isinstance(r, tuple):
            # ToMe's convention: a tuple is (r, inflect); a per-layer schedule is a list
            if len(r) != 2 or inflect is not None:
                raise ConfigError(f"{who}: r={r!r} is invalid; a tuple must be (r, inflect), per-layer counts a list")
            r, inflect = r
        if isinstance(r, float) and self.fractional:
            if not 0 <= r < 1:
                raise ConfigError(
                    f"{who}: r={r!r} is invalid; allowed: an integer >= 0, or a fraction in [0, 1) of the tokens"
                )
            if inflect is not None:
                raise ConfigError(f"{who}: inflect={inflect!r} needs an integer r, got the fraction r={r!r}")
        elif is_list(r):
            r = check_numbers(who, "r", r, low=0, integer=True)
        elif r is not None:
            r = check_number(who, "r", r, low=0, integer=True)
        if self.ratio is not None:  # each value's range first: "not both" only for two valid values
            ratio = self.ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ConfigError(f"{who}: ratio={ratio!r} is invalid; allowed: a keep ratio in (0, 1]")
        if r is not None and self.ratio is not None:
            raise ConfigError(f"{who}: give either r={self.r!r} or ratio={self.ratio!r}, not both")
        if inflect is not None:
            if not isinstance(r, int):
                raise ConfigError(f"{who}: inflect={inflect!r} needs a single integer r, got r={self.r!r}")
            if isinstance(inflect, bool) or not isinstance(inflect, (int, float)):
                raise ConfigError(f"{who}: inflect={inflect!r} is invalid; allowed: a number, e.g. -1")
        layers = self.layers
        if layers is not None:
            layers = tuple(check_numbers(who, "layers", layers, low=0, integer=True))
        object.__setattr__(self, "r", r)
        object.__setattr__(self, "inflect", inflect)
        object.__setattr__(self, "layers", layers)
        # torch.compile makes a float attribute that differs between two compiled models a symbolic
        # input, whose floor below it cannot trace; read back from its text (`float` of a string
        # folds), the ratio stays a constant of each graph
        object.__setattr__(self, "_ratio_text", None if self.ratio is None else repr(float(self.ratio)))

    @property
    def removes_nothing(self) -> bool:
        if self.ratio is not None:
            return self.ratio == 1
        if isinstance(self.r, list):
            return not any(self.r)
        return not self.r

    def check_depth(self, num_layers: int) -> None:
        """Errors that need the model: a list longer than the model, layers beyond it."""
        if isinstance(self.r, list) and len(self.r) > num_layers:
            raise ConfigError(
                f"{self.owner}: r has {len(self.r)} entries but the model has {num_layers} blocks; "
                f"allowed: at most {num_layers} entries"
            )
        if self.layers is not None and any(layer >= num_layers for layer in self.layers):
            raise ConfigError(
                f"{self.owner}: layers={list(self.layers)} reaches beyond the model's {num_layers} blocks; "
                f"allowed: 0 .. {num_layers - 1}"
            )

    def _wanted(self, layer: int, num_layers: int, tokens: int) -> int:
        if self.layers is not None and layer not in self.layers:
            return 0
        if self.ratio is not None:
            return keep_ratio_removal(tokens, float(self._ratio_text))
        if isinstance(self.r, list):
            return self.r[layer] if layer < len(self.r) else 0
        if isinstance(self.r, float):
            return int(tokens * self.r)
        r = self.r or 0
        if self.inflect is None:
            return r
        lo = int(r * (1.0 - self.inflect))
        hi = 2 * r - lo
        return int(lo + (hi - lo) * layer / max(num_layers - 1, 1))

    def removal_at(self, layer: int, num_layers: int, tokens: int, cap: Cap = half_cap) -> int:
        """Tokens `layer` removes when `tokens` non-prefix tokens enter it."""
        return max(0, min(self._wanted(layer, num_layers, tokens), cap(tokens)))

    def removal_counts(self, num_layers: int, num_tokens: int, cap: Cap = half_cap, refill: int = 0) -> list[int]:
        """Per-layer removal counts for `num_tokens` non-prefix tokens entering layer 0.

        refill: tokens a reducing layer adds back after removing its count (EViT's fused token), so
        the next layer sees ``T - r + refill`` tokens.
        """
        self.check_depth(num_layers)
        counts = []
        tokens = num_tokens
        for layer in range(num_layers):
            r = self.removal_at(layer, num_layers, tokens, cap)
            counts.append(r)
            tokens -= r
            if r > 0:
                tokens += refill
        return counts


def token_counts(num_tokens: int, removals: Sequence[int]) -> list[int]:
    """Non-prefix tokens entering each layer, and after the last one."""
    counts = [num_tokens]
    for r in removals:
        counts.append(counts[-1] - r)
    return counts
