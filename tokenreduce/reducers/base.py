"""The `TokenReducer` interface and the registry of reducers by name."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from tokenreduce.core.contract import (  # noqa: F401  (the signal keys, re-exported for reducers)
    ATTN,
    KEYS,
    SIGNALS,
    BlockOps,
    ModelInfo,
    Signals,
    is_patched,
)
from tokenreduce.core.schedule import Cap, Schedule, half_cap
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, check_flag

# Profiler scope around a reducer's own work (matching and merging), so benchmarks can measure its share.
REDUCE_SCOPE = "tokenreduce.reduce"
_NO_SCOPE = nullcontext()


def reduce_scope():
    """The profiler scope `REDUCE_SCOPE`, opened only while a profiler records: entering one costs
    several microseconds, a few tenths of a percent of a batch-1 pass."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return _NO_SCOPE
    return record_function(REDUCE_SCOPE)


@dataclass(frozen=True)
class Strength:
    """The one parameter that sets how much a method removes, so that methods can be compared at
    matched cost (`tokenreduce.match_macs`).

    param:         the constructor argument
    low, high:     its allowed range; high None means bounded by the model's number of tokens
    integer:       whether it takes integers (a removal count) or real numbers (a keep ratio)
    larger_removes: True when a larger value removes more tokens (r), False when it keeps more (ratio)
    """

    param: str
    low: float
    high: float | None
    integer: bool
    larger_removes: bool


REMOVAL_COUNT = Strength("r", 0, None, integer=True, larger_removes=True)
KEEP_RATIO = Strength("ratio", 0.0, 1.0, integer=False, larger_removes=False)
# bipartite methods remove at most half the tokens per layer, so keep ratios below 0.5 change nothing
HALF_KEEP_RATIO = Strength("ratio", 0.5, 1.0, integer=False, larger_removes=False)


class TokenReducer(nn.Module):
    """One token-reduction method. Subclass, register with `@register_reducer(name)`, and implement
    `reduce` (for methods that act between a block's attention and its MLP) or override
    `block_forward` (for methods that need another placement).

    Constructor arguments are the method's parameters; validate them there, so a wrong value fails
    before any compute. A reducer may own trainable modules (it is an `nn.Module` attached to the
    model), whose weights then live in the model's state dict.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    cap: ClassVar[Cap] = staticmethod(half_cap)
    refill: ClassVar[int] = 0  # tokens a reducing layer adds back after removing (EViT's fused token)
    # the parameters that set its strength, for matched-cost comparisons; the first is searched by
    # default (the finest-grained); empty for methods without one
    strength: ClassVar[tuple[Strength, ...]] = ()

    def __init__(self, schedule: Schedule, prop_attn: bool = True, trace_source: bool = False):
        super().__init__()
        check_flag(self.name, "prop_attn", prop_attn)
        check_flag(self.name, "trace_source", trace_source)
        self.schedule = schedule
        self.prop_attn = prop_attn
        self.trace_source = trace_source

    # --- what the adapter asks -------------------------------------------------------------
    def check_model(self, info: ModelInfo) -> None:
        """Raise ConfigError when this reducer cannot run on the model (called by `apply`)."""
        self.schedule.check_depth(info.depth)

    def removal_counts(self, num_layers: int, num_tokens: int) -> list[int]:
        """Tokens removed by each layer, given `num_tokens` non-prefix tokens entering layer 0."""
        return self.schedule.removal_counts(num_layers, num_tokens, self.cap, refill=self.refill)

    def removal_at(self, layer: int, num_layers: int, tokens: int) -> int:
        """Tokens `layer` removes when `tokens` non-prefix tokens enter it (one step of
        `removal_counts`; what `compose` asks each part)."""
        return self.schedule.removal_at(layer, num_layers, tokens, self.cap)

    def acts_at(self, layer: int, removal: int) -> bool:
        """Whether the block at `layer` runs `block_forward`; the others run unchanged."""
        return removal > 0

    def block_forward(self, ops: BlockOps, x: Tensor, state: ReductionState, layer: int, removal: int) -> Tensor:
        """Default placement: reduce between the attention residual and the MLP."""
        x, signals = ops.attention(x, state.attn_bias(x.dtype), self.needs)
        with reduce_scope():
            x = self.reduce(x, signals, state, layer, removal)
        return ops.mlp(x)

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement reduce() or block_forward()")

    def training_losses(self, context) -> dict[str, Tensor]:
        """Loss terms this method adds to a fine-tuning step, by name (none by default).

        `context` is a `tokenreduce.engine.losses.LossContext`: the model, the batch, the main pass's
        tokens and logits, the main criterion. A method may run the model again here.
        """
        return {}

    def has_training_losses(self) -> bool:
        """Whether this method adds loss terms to a training step (overrides `training_losses`)."""
        return type(self).training_losses is not TokenReducer.training_losses

    # --- description -----------------------------------------------------------------------
    def params(self) -> dict:
        """The constructor arguments this reducer was built with, for records and run names."""
        return dict(self._params)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._params.items())


_REGISTRY: dict[str, type[TokenReducer]] = {}


def register_reducer(name: str):
    """Class decorator: make a `TokenReducer` subclass available as `name`."""

    def wrap(cls: type[TokenReducer]) -> type[TokenReducer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a reducer named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        original_init = cls.__init__

        def __init__(self, *args, **kwargs):
            bound = inspect.signature(original_init).bind(self, *args, **kwargs)
            bound.apply_defaults()
            original_init(self, *args, **kwargs)
            self._params = {k: v for k, v in list(bound.arguments.items())[1:]}

        __init__.__wrapped__ = original_init
        __init__.__doc__ = original_init.__doc__
        cls.__init__ = __init__
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names of all registered reducers."""
    return sorted(_REGISTRY)


def reducer_class(name: str) -> type[TokenReducer]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"reducer={name!r} is not registered; available: {', '.join(available())}")
    return _REGISTRY[name]


def reducer_defaults(name: str) -> dict:
    """Every parameter of reducer `name` with its default value."""
    init = inspect.unwrap(reducer_class(name).__init__)
    return {
        p.name: p.default
        for p in list(inspect.signature(init).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def create_reducer(name: str, **params) -> TokenReducer:
    """Build reducer `name`; an unknown name or parameter is a ConfigError listing what is allowed."""
    cls = reducer_class(name)
    allowed = reducer_defaults(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'no parameters'}"
        )
    return cls(**params)


def carried_reducer(model: nn.Module, cls: type[TokenReducer], who: str) -> TokenReducer:
    """The reducer `tokenreduce.apply` placed into `model`, which must be a `cls`; a ConfigError
    naming `who` (the function that needs it) otherwise."""
    reducer = getattr(model, "token_reducer", None) if is_patched(model) else None
    if not isinstance(reducer, cls):
        raise ConfigError(f"{who}: the model must carry a {cls.name!r} reducer (tokenreduce.apply(model, {cls.name!r}))")
    return reducer
