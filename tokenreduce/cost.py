"""Matched cost: the setting of a reducer whose MACs are a given fraction of the unreduced model's.

Methods are compared fairly only at equal cost; each registered reducer names its one strength
parameter (`TokenReducer.strength`: a removal count r or a keep ratio), and `match_macs` searches it.
MACs come from one forward pass of a single image at the model's input size: token counts never
depend on the image content, so this is the cost of every image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenreduce.api import apply, reducer_of, remove, stats
from tokenreduce.data.transforms import model_data_config
from tokenreduce.errors import ConfigError, check_number
from tokenreduce.reducers.base import reducer_class

RATIO_STEP = 1e-3  # keep ratios are searched on this grid, so the values found read well in tables


def reducer_macs(model: nn.Module, reducer: str, **params) -> int:
    """MACs of one image through `model` reduced by `reducer(**params)`; the model is left as it was."""
    with _restored(model):
        return _macs(model, reducer, params)


def match_macs(model: nn.Module, reducer: str, fraction: float, tolerance: float = 0.02, param: str | None = None,
               **fixed) -> tuple[dict, float]:
    """The parameters for `apply(model, reducer, **params)` whose MACs come closest to `fraction` of
    the unreduced model's, and the MAC fraction they reach.

    The reducer's strength parameter is searched: `param` (e.g. "r" for ToMe), or by default its
    finest-grained one (`TokenReducer.strength`); `fixed` parameters are passed as given and
    included in the result. A target that the closest setting misses by more than
    `tolerance` (relative) is a ConfigError naming the reachable range. The model is left as it was.
    """
    check_number("match_macs", "fraction", fraction, low=0, high=1, low_open=True)
    check_number("match_macs", "tolerance", tolerance, low=0)
    strengths = {s.param: s for s in reversed(reducer_class(reducer).strength)}
    if not strengths:
        raise ConfigError(f"match_macs: reducer={reducer!r} has no strength parameter to search; allowed: a reducer "
                          f"with a removal count r or a keep ratio ({', '.join(searchable())})")
    if param is None:
        param = reducer_class(reducer).strength[0].param
    if param not in strengths:
        raise ConfigError(f"match_macs: param={param!r} is not a strength of {reducer}; allowed: "
                          f"{', '.join(strengths)}")
    strength = strengths[param]
    if strength.param in fixed:
        raise ConfigError(f"match_macs: {strength.param}={fixed[strength.param]!r} is the parameter being searched; "
                          f"allowed: fixed parameters other than {strength.param}")
    step = 1 if strength.integer else RATIO_STEP
    first = math.ceil(strength.low / step - 1e-9)
    if not strength.integer and strength.param == "ratio":
        first = max(first, 1)  # a keep ratio of 0 is never allowed
    last = _num_patches(model) if strength.high is None else math.floor(strength.high / step + 1e-9)

    def value(k: int):
        return k if strength.integer else round(k * step, 6)

    with _restored(model):
        baseline = _macs(model, "none", {})
        cache: dict[int, float] = {}

        def reached(k: int) -> float:
            if k not in cache:
                cache[k] = _macs(model, reducer, {**fixed, strength.param: value(k)}) / baseline
            return cache[k]

        # MACs fall monotonically as the strength grows (r up, ratio down): bisect for the first
        # grid point at or below the target, then take the closer of it and its neighbour.
        removes_more = (lambda k: k) if strength.larger_removes else (lambda k: first + last - k)
        lo, hi = first, last
        while lo < hi:
            mid = (lo + hi) // 2
            if reached(removes_more(mid)) <= fraction:
                hi = mid
            else:
                lo = mid + 1
        candidates = {removes_more(i) for i in (lo - 1, lo) if first <= i <= last}
        best = min(candidates, key=lambda k: (abs(reached(k) - fraction), k))
        lowest, highest = reached(removes_more(last)), reached(removes_more(first))
    if abs(reached(best) - fraction) > tolerance * fraction:
        raise ConfigError(
            f"match_macs: fraction={fraction:g} is out of reach for {reducer}: {strength.param} from "
            f"{value(first):g} to {value(last):g} gives MAC fractions {lowest:.3f} to {highest:.3f}"
            f"{' with ' + ', '.join(f'{k}={v!r}' for k, v in fixed.items()) if fixed else ''}; "
            f"allowed: a fraction within that range (tolerance {tolerance:g})")
    return {**fixed, strength.param: value(best)}, reached(best)


def searchable() -> list[str]:
    """The registered reducers that `match_macs` can set."""
    from tokenreduce.reducers import available

    return [name for name in available() if reducer_class(name).strength]


def probe_pass(model: nn.Module) -> dict:
    """`stats` of one blank image at the model's input size, in eval mode (the mode is restored):
    the tokens and MACs of every image, since token counts do not depend on the content."""
    param = next(model.parameters())
    size = model_data_config(model)["input_size"]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        model(torch.zeros(1, *size, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return stats(model)


def _macs(model: nn.Module, reducer: str, params: dict) -> int:
    apply(model, reducer, **params)
    return probe_pass(model)["macs"]


def _num_patches(model: nn.Module) -> int:
    embed = getattr(model, "patch_embed", None)
    count = getattr(embed, "num_patches", None)
    if count is None:
        raise ConfigError(f"match_macs: model {type(model).__name__} has no patch_embed.num_patches to bound r")
    return int(count)


class _restored:
    """Put the model back as it came: its reducer (or none) and its train/eval mode."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.reducer = reducer_of(self.model)
        self.training = self.model.training
        self.model.eval()
        return self

    def __exit__(self, *exc):
        if self.reducer is not None:
            apply(self.model, self.reducer)
        else:
            remove(self.model)
        self.model.train(self.training)
        return False
