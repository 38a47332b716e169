"""The registry of adapters, each placing reducers into one model family (docs/adapters.md).

What a reducer may know about a model and do with one block is the contract in
`tokenreduce.core.contract`, re-exported here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import nn

from tokenreduce.core.contract import BlockOps, BlockReducer, ModelInfo, Patch, is_patched
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnclaimedModelError

__all__ = ["Adapter", "BlockOps", "ModelInfo", "Patch", "adapter_for", "adapters", "is_patched", "register_adapter"]


# --- adapters and their registry ----------------------------------------------------------------
class Adapter:
    """How reducers are placed into one model family. Subclass, register with `@register_adapter`.

    A subclass sets `family` (words for messages), `reduced_methods` (a class whose methods are
    placed in front of the model's own class while it is patched) and `options` (each setting's
    allowed values, the default first), and implements `claims`, `describe` and `pass_macs`.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    reduced_methods: ClassVar[type] = object
    options: ClassVar[dict[str, tuple]] = {}

    def claims(self, model: nn.Module) -> bool:
        """Whether `model` belongs to this family (cheap; `describe` then checks every detail)."""
        raise NotImplementedError

    def describe(self, model: nn.Module) -> ModelInfo:
        """The model's facts; raise UnsupportedModelError for a member this adapter cannot run exactly."""
        raise NotImplementedError

    def pass_macs(self, model: nn.Module, state: ReductionState) -> dict[str, int]:
        """MACs of one image for the pass that left `state`: embed, blocks, reducer, head, total."""
        raise NotImplementedError

    def check_reducer(self, model: nn.Module, reducer: BlockReducer, info: ModelInfo, options: dict) -> None:
        """Raise ConfigError when `reducer` cannot run in this family's `model` with `options`
        (called by `apply` after the reducer's own checks, before the model is touched)."""

    def reducer_info(self, model: nn.Module, reducer: BlockReducer, info: ModelInfo) -> ModelInfo:
        """The facts `reducer` is checked against (`check_model`): the model's, or those of the part of
        it the reducer runs in (a vision-language model's vision tower)."""
        return info

    def inner_model(self, obj) -> nn.Module | None:
        """The model inside a container this family knows (a diffusers pipeline's denoiser), or None."""
        return None

    def pass_stats(self, model: nn.Module, state: ReductionState) -> dict | None:
        """The family's own `stats` of the pass that left `state`; None: the block loop's."""
        return None

    def chain_stats(self, model: nn.Module, state: ReductionState) -> dict:
        """The block loop's `stats` of the pass that left `state`: tokens through each block, those
        each block removed, and the MACs of one image."""
        tokens = state.tokens_per_layer()
        entering = [rec.tokens_in for rec in state.records] + [state.final_tokens]
        macs = self.pass_macs(model, state)
        return {"tokens": tokens, "removed": [a - b for a, b in zip(entering[:-1], entering[1:], strict=True)],
                "macs": macs["total"], "macs_parts": macs}

    def probe_inputs(self, model: nn.Module) -> dict | None:
        """Keyword inputs of one sample for a cost probe (`cost.probe_pass`), whose token counts are
        every sample's; None: one blank image at the model's input size, passed positionally."""
        return None

    def token_bound(self, model: nn.Module) -> int:
        """The most tokens a removal count or a token budget can name on `model` (its patches)."""
        count = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        if count is None:
            raise ConfigError(f"model {type(model).__name__} has no patch_embed.num_patches to bound a token count")
        return int(count)

    def check_options(self, options: dict | None) -> dict:
        """The adapter's options with defaults filled in; an unknown name or value is a ConfigError."""
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(f"adapter_options={options!r} is invalid; allowed: a dict of the {self.family} "
                              f"adapter's options ({', '.join(self.options) or 'none'})")
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(f"adapter_options: {', '.join(unknown)} not known to the {self.family} adapter; "
                              f"allowed: {', '.join(self.options) or 'no options'}")
        for key, value in options.items():
            if value not in self.options[key]:
                raise ConfigError(f"adapter_options: {key}={value!r} is invalid; allowed: "
                                  f"{', '.join(map(repr, self.options[key]))}")
        return {key: options.get(key, allowed[0]) for key, allowed in self.options.items()}

    def patch(self, model: nn.Module, reducer: BlockReducer, info: ModelInfo, options: dict) -> None:
        model._tokenreduce = Patch(adapter=self, original_class=type(model), info=info, options=options)
        model.token_reducer = reducer
        model.__class__ = self._reduced_class(type(model))

    def unpatch(self, model: nn.Module) -> None:
        model.__class__ = model._tokenreduce.original_class
        del model.token_reducer
        del model._tokenreduce

    def _reduced_class(self, cls: type) -> type:
        # one class per (adapter, model class), so patched models of a class share it
        key = (self.name, cls)
        if key not in _REDUCED_CLASSES:
            _REDUCED_CLASSES[key] = self.build_reduced_class(cls)
        return _REDUCED_CLASSES[key]

    def build_reduced_class(self, cls: type) -> type:
        """The class a model of class `cls` takes while it is patched (built once per model class):
        `reduced_methods` in front of `cls`."""
        return type(f"TokenReduced{cls.__name__}", (self.reduced_methods, cls), {})


_REDUCED_CLASSES: dict[tuple[str, type], type] = {}
_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str):
    """Class decorator: make an `Adapter` subclass one of the families `apply` can reduce."""

    def wrap(cls: type[Adapter]) -> type[Adapter]:
        if name in _ADAPTERS and type(_ADAPTERS[name]) is not cls:
            raise ValueError(f"an adapter named {name!r} is already registered ({type(_ADAPTERS[name]).__name__})")
        cls.name = name
        _ADAPTERS[name] = cls()
        return cls

    return wrap


def adapters() -> dict[str, Adapter]:
    """The registered adapters by name, in registration order."""
    return dict(_ADAPTERS)


def model_of(obj) -> nn.Module:
    """The model `obj` stands for: itself, or the model inside a container an adapter knows."""
    if isinstance(obj, nn.Module):
        return obj
    return next((inner for a in _ADAPTERS.values() if (inner := a.inner_model(obj)) is not None), obj)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter that placed the model's reducer, or else the one that claims the model.

    A model no adapter claims is a ConfigError listing the supported families; a windowed or
    hierarchical transformer is refused with the reason.
    """
    if is_patched(model):
        return model._tokenreduce.adapter
    claimed = [a for a in _ADAPTERS.values() if a.claims(model)]
    if len(claimed) == 1:
        return claimed[0]
    if len(claimed) > 1:  # a registration bug, not a user error
        raise RuntimeError(f"{type(model).__name__} is claimed by several adapters: {[a.name for a in claimed]}")
    families = "; ".join(a.family for a in _ADAPTERS.values())
    windowed = _windowed_kind(model)
    if windowed:
        raise UnclaimedModelError(
            f"model {type(model).__name__} is a {windowed}: its attention runs in windows that tile a fixed token "
            f"grid, and token reduction changes the number of tokens, so the windows would no longer tile; use a "
            f"plain (global-attention) model instead, supported: {families}")
    raise UnclaimedModelError(f"model {type(model).__name__} is not claimed by any adapter; supported: {families}")


def facts_of(model: nn.Module) -> ModelInfo:
    """The facts of `model` its reducers are checked against: those recorded when it was patched (a
    patched model, or a part of it, may no longer look like what `describe` accepts), else its
    adapter's `describe`."""
    return model._tokenreduce.info if is_patched(model) else adapter_for(model).describe(model)


def _windowed_kind(model: nn.Module) -> str | None:
    """Words for a timm windowed or hierarchical transformer, None for any other model."""
    from timm.models import (
        davit,
        hiera,
        maxxvit,
        mvitv2,
        swin_transformer,
        swin_transformer_v2,
        swin_transformer_v2_cr,
    )

    kinds = {
        swin_transformer.SwinTransformer: "Swin Transformer (shifted-window attention)",
        swin_transformer_v2.SwinTransformerV2: "Swin Transformer V2 (shifted-window attention)",
        swin_transformer_v2_cr.SwinTransformerV2Cr: "Swin Transformer V2 (shifted-window attention)",
        maxxvit.MaxxVit: "MaxViT/CoAtNet (block and grid window attention)",
        hiera.Hiera: "Hiera (mask-unit window attention)",
        davit.DaVit: "DaViT (window attention)",
        mvitv2.MultiScaleVit: "MViTv2 (pooling attention over a token grid)",
    }
    return next((words for cls, words in kinds.items() if isinstance(model, cls)), None)
