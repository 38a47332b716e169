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

from tokenreduce.adapters import adapter_for
from tokenreduce.adapters.base import model_of
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
    On a vision-language model the MACs are one sample's prefill (vision tower, projector, language
    model: `stats(model)["macs_parts"]`).
    """
    check_number("match_macs", "fraction", fraction, low=0, high=1, low_open=True)
    check_number("match_macs", "tolerance", tolerance, low=0)
    with _restored(model):
        baseline = _macs(model, "none", {})
        return _search("match_macs", model, reducer, "fraction", fraction, "MAC fractions",
                       lambda s: s["macs"] / baseline, tolerance, param, fixed)


VISUAL_MEASURES = ("final", "mean")


def match_visual_tokens(model: nn.Module, reducer: str, tokens: int, measure: str = "final", tolerance: float = 0.02,
                        param: str | None = None, **fixed) -> tuple[dict, float]:
    """The parameters for `apply(model, reducer, **params)` with which a vision-language model keeps
    `tokens` visual tokens per image, as the papers compare methods (64, 128, 192 of LLaVA-1.5's 576),
    and the count they reach.

    measure: "final", the visual tokens through the language model's last layer (a cut in the
             tower or at the boundary: those entering the language model; FastV: those after
             its layer); "mean", their mean over the decoder layers, which prices a method that
             cuts in stages (PyramidDrop) by what its layers process
    The strength parameter is searched as by `match_macs` (`param`, `fixed`, `tolerance` relative
    to `tokens`). A reducer whose count adapts to each image (PruMerge) has no strength to set.
    The model is left as it was.
    """
    who = "match_visual_tokens"
    check_number(who, "tokens", tokens, low=1, integer=True)
    check_number(who, "tolerance", tolerance, low=0)
    if measure not in VISUAL_MEASURES:
        raise ConfigError(f"{who}: measure={measure!r} is invalid; allowed: " + ", ".join(map(repr, VISUAL_MEASURES)))

    def counted(s: dict) -> float:
        if "visual_tokens" not in s:
            raise ConfigError(f"{who}: model {type(model_of(model)).__name__} has no visual tokens; allowed: a "
                              "vision-language model (docs/vlm.md)")
        per_layer = s["visual_tokens"]
        return per_layer[-1] if measure == "final" else sum(per_layer) / len(per_layer)

    with _restored(model):
        return _search(who, model, reducer, "tokens", tokens, "visual tokens", counted, tolerance, param, fixed)


def _search(who: str, model: nn.Module, reducer: str, name: str, target: float, unit: str, measure,
            tolerance: float, param: str | None, fixed: dict) -> tuple[dict, float]:
    """Bisect the reducer's strength parameter for the setting whose probe pass `measure`s closest to
    `target` (the measure falls as the strength removes more). A setting the model refuses (a
    budget above its tokens) counts as removing nothing, so the search stays below it."""
    strengths = {s.param: s for s in reversed(reducer_class(reducer).strength)}
    if not strengths:
        raise ConfigError(f"{who}: reducer={reducer!r} has no strength parameter to search; allowed: a reducer "
                          f"with a removal count, a keep ratio or a token budget ({', '.join(searchable())})")
    if param is None:
        param = reducer_class(reducer).strength[0].param
    if param not in strengths:
        raise ConfigError(f"{who}: param={param!r} is not a strength of {reducer}; allowed: {', '.join(strengths)}")
    strength = strengths[param]
    if strength.param in fixed:
        raise ConfigError(f"{who}: {strength.param}={fixed[strength.param]!r} is the parameter being searched; "
                          f"allowed: fixed parameters other than {strength.param}")
    step = 1 if strength.integer else RATIO_STEP
    first = math.ceil(strength.low / step - 1e-9)
    if not strength.integer and strength.param == "ratio":
        first = max(first, 1)  # a keep ratio of 0 is never allowed
    last = adapter_for(model_of(model)).token_bound(model_of(model)) if strength.high is None else math.floor(
        strength.high / step + 1e-9)

    def value(k: int):
        return k if strength.integer else round(k * step, 6)

    cache: dict[int, float] = {}
    refusals: dict[int, ConfigError] = {}

    def reached(k: int) -> float:
        if k not in cache:
            try:
                apply(model, reducer, **{**fixed, strength.param: value(k)})
                probed = probe_pass(model)
            except ConfigError as error:  # the model refuses this setting
                cache[k], refusals[k] = math.inf, error
                return cache[k]
            cache[k] = measure(probed)  # a measure the model cannot give fails at the first probe
        return cache[k]

    # the measure falls monotonically as the strength grows (r up, ratio down): bisect for the first
    # grid point at or below the target, then take the closer of it and its neighbour
    removes_more = (lambda k: k) if strength.larger_removes else (lambda k: first + last - k)
    lo, hi = first, last
    while lo < hi:
        mid = (lo + hi) // 2
        if reached(removes_more(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    candidates = {removes_more(i) for i in (lo - 1, lo) if first <= i <= last}
    best = min(candidates, key=lambda k: (abs(reached(k) - target), k))
    if math.isinf(reached(best)):
        raise refusals[best]
    if abs(reached(best) - target) > tolerance * target:
        lowest, highest = reached(removes_more(last)), reached(removes_more(first))
        refused = ""
        if math.isinf(highest):  # the weakest settings are refused (a budget above the tokens): find the last that runs
            lo, hi = first, last
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if not math.isinf(reached(removes_more(mid))) else (mid + 1, hi)
            highest = reached(removes_more(lo))
            refused = f" ({strength.param} beyond {value(removes_more(lo)):g} is refused by the model)"
        raise ConfigError(
            f"{who}: {name}={target:g} is out of reach for {reducer}: {strength.param} from "
            f"{value(first):g} to {value(last):g} gives {unit} {lowest:.3f} to {highest:.3f}{refused}"
            f"{' with ' + ', '.join(f'{k}={v!r}' for k, v in fixed.items()) if fixed else ''}; "
            f"allowed: a {name} within that range (tolerance {tolerance:g})")
    return {**fixed, strength.param: value(best)}, reached(best)


def searchable() -> list[str]:
    """The registered reducers that `match_macs` can set."""
    from tokenreduce.reducers import available

    return [name for name in available() if reducer_class(name).strength]


def probe_pass(model: nn.Module) -> dict:
    """`stats` of one probe sample in eval mode (the mode is restored): a blank image at the model's
    input size, or the sample its adapter gives (`Adapter.probe_inputs`: a prompt with an image for a
    vision-language model); the tokens and MACs of every sample, since token counts do not depend on
    the content."""
    inner = model_of(model)
    param = next(inner.parameters())
    inputs = adapter_for(inner).probe_inputs(inner)
    was_training = inner.training
    inner.eval()
    with torch.inference_mode():
        if inputs is None:
            size = model_data_config(inner)["input_size"]
            inner(torch.zeros(1, *size, device=param.device, dtype=param.dtype))
        else:
            inner(**inputs)
    inner.train(was_training)
    return stats(inner)


def _macs(model: nn.Module, reducer: str, params: dict) -> int:
    apply(model, reducer, **params)
    return probe_pass(model)["macs"]


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
