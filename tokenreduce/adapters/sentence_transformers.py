"""Placing a reducer into a sentence-transformers `SentenceTransformer` (>= 6) whose modules are a
`Transformer` holding a transformers `BertModel`, `RobertaModel` or `DistilBertModel`, then `Pooling`
(then any modules that read the sentence embedding, e.g. `Dense`, `Normalize`).

The transformers model is patched by hf_text (padded batches run in groups of equal real length, the
first and last real tokens kept) and holds the reducer; the SentenceTransformer reaches it through
the model. The `Pooling` module gets a `forward` that reads the reduced tokens with their mask and
sizes: sentence-transformers' own pooling would take the input's attention mask, which no longer
fits the tokens, and fall back to averaging every token, padding included, with equal weights. Each
pooling mode counts every input token once with the value of the token it went into:

    cls                    the first token (never merged)
    lasttoken              the last real token (never merged)
    max                    the maximum over the real tokens
    mean                   the mean of the real tokens weighted by their sizes
    mean_sqrt_len_tokens   their size-weighted sum over the square root of the input's real tokens
    weightedmean           each token weighted by the positions (from 1) of the input tokens it holds,
                           read from the source map: only with a reducer built with trace_source=True

The features then carry the reduced tokens' `attention_mask`, so `encode(output_value=
"token_embeddings")` gives each sentence's reduced tokens. A prompt excluded from pooling
(`include_prompt=False`) is refused: its tokens merge with the text's.

`sentence_transformers` is imported only when a model's class comes from it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import (
    Adapter,
    ModelInfo,
    Patch,
    adapters,
    is_patched,
    register_adapter,
)
from tokenreduce.adapters.hf_text import PIPELINE_LINK, HFTextAdapter, mean_pool
from tokenreduce.adapters.hf_text import describe as describe_text
from tokenreduce.adapters.hf_text import model_spec as text_spec
from tokenreduce.adapters.hf_text import pass_macs as text_macs
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnclaimedModelError, UnsupportedModelError

INSTALL_HINT = "pip install 'tokenreduce[hf]' (sentence-transformers>=6)"
LAYOUT = ("a Transformer module holding a transformers BertModel, RobertaModel or DistilBertModel, then Pooling "
          "(then modules that read the sentence embedding, e.g. Dense, Normalize)")
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
TRACED = ("weightedmean",)  # modes that need each token's input positions (the source map)


def _classes() -> tuple[type, type, type]:
    """sentence-transformers' SentenceTransformer, Transformer and Pooling; a ConfigError saying how to
    install it when it is missing."""
    try:
        package = importlib.import_module("sentence_transformers")
        modules = importlib.import_module("sentence_transformers.sentence_transformer.modules")
    except ImportError as err:
        raise ConfigError(f"SentenceTransformer models need the sentence-transformers package (it could not be "
                          f"imported: {err}); install it with {INSTALL_HINT}") from err
    return package.SentenceTransformer, modules.Transformer, modules.Pooling


def _from_sentence_transformers(cls: type) -> bool:
    return any(c.__module__.split(".")[0] == "sentence_transformers" for c in cls.__mro__)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The Transformer module, its transformers model and the Pooling module of a claimed model."""
    transformer, pooling = list(model.children())[:2]
    return transformer, transformer.auto_model, pooling


def _modes(pooling: nn.Module) -> tuple[str, ...]:
    mode = pooling.pooling_mode
    return (mode,) if isinstance(mode, str) else tuple(mode)


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; its transformers model's facts (hf_text's)."""
    sentence_cls, transformer_cls, pooling_cls = _classes()
    name = type(model).__name__
    if not isinstance(model, sentence_cls):
        raise UnclaimedModelError(f"model {name} is not supported by the sentence-transformers adapter; supported: "
                                  f"SentenceTransformer with {LAYOUT} (a CrossEncoder's transformers model, its "
                                  "`model`, is reduced by applying the reducer to it)")
    modules = list(model.children())
    if len(modules) < 2 or not isinstance(modules[0], transformer_cls) or not isinstance(modules[1], pooling_cls):
        raise UnsupportedModelError(f"model {name} has the modules {[type(m).__name__ for m in modules]}; "
                                    f"supported: {LAYOUT}")
    transformer, inner, pooling = _parts(model)
    if getattr(transformer, "backend", "torch") != "torch" or getattr(transformer, "module_output_name",
                                                                       None) != "token_embeddings":
        raise UnsupportedModelError(f"model {name}: its Transformer module runs the {transformer.backend!r} backend "
                                    f"into {transformer.module_output_name!r}; supported: backend 'torch' giving "
                                    "'token_embeddings'")
    unknown = sorted(set(_modes(pooling)) - set(MODES))
    if unknown:
        raise UnsupportedModelError(f"model {name}: pooling_mode {', '.join(unknown)} is not known to the adapter; "
                                    f"supported: {', '.join(MODES)}")
    if is_patched(inner):
        raise UnsupportedModelError(f"model {name}: its transformers model already carries a reducer; call "
                                    "tokenreduce.remove(model[0].auto_model) first")
    info = describe_text(inner)
    if text_spec(inner)[1] != "base":
        raise UnsupportedModelError(f"model {name}: its Transformer module holds {type(inner).__name__}; supported: "
                                    "BertModel, RobertaModel, DistilBertModel (the tokens a Pooling module reads)")
    return info


# --- the patched modules ---------------------------------------------------------------------------
@dataclass
class _Link:
    """What the Pooling module and the transformers model keep while the SentenceTransformer is patched:
    the SentenceTransformer and their own class. Kept in their __dict__, not as a submodule, so parameters
    and state dicts are unchanged."""

    owner: nn.Module
    original_class: type


def check_features(model: nn.Module, features: dict) -> None:
    """Refuse, before any compute, what the pooling cannot do with merged tokens, naming the setting."""
    _, _, pooling = _parts(model)
    traced = sorted(set(_modes(pooling)) & set(TRACED))
    if traced and not getattr(model.token_reducer, "trace_source", False):
        raise ConfigError(f"pooling_mode {traced[0]!r} weights each token by its position, which a merged token has "
                          f"several of; allowed: a reducer built with trace_source=True (a token is then weighted by "
                          f"its input tokens' positions), or pooling modes "
                          f"{', '.join(m for m in MODES if m not in TRACED)}")
    prompt = features.get("prompt_length")
    if not pooling.include_prompt and prompt is not None and bool(torch.as_tensor(prompt).any()):
        raise ConfigError(f"include_prompt=False with a prompt (prompt_length={int(torch.as_tensor(prompt).max())}) "
                          "is not supported on a token-reduced SentenceTransformer: the prompt's tokens merge with the "
                          "text's, so they cannot be left out of the pooling; allowed: include_prompt=True, or encode "
                          "without a prompt")


class _ReducedSentenceTransformer:
    """Methods of the SentenceTransformer's class while it is patched."""

    @property
    def token_reducer(self):  # held by the transformers model, which moves and trains it with its weights
        return _parts(self)[1].token_reducer

    def forward(self, input: dict, **kwargs):
        check_features(self, input)
        return self._tokenreduce.original_class.forward(self, input, **kwargs)


def position_weights(source: Tensor, tokens: int) -> Tensor:
    """[B, tokens]: for each output token the sum of the positions (from 1) of the input tokens it holds,
    from a source map [B, L] (`tokens` or more marks a dropped input token)."""
    positions = torch.arange(1, source.shape[1] + 1, device=source.device, dtype=torch.float32)
    weights = torch.zeros(source.shape[0], tokens + 1, device=source.device)
    return weights.scatter_add_(1, source.clamp_max(tokens), positions.expand_as(source))[:, :tokens]


def pool(mode: str, inner: nn.Module, x: Tensor, state: ReductionState) -> Tensor:
    """[B, C] one pooling mode over the reduced tokens `x` [B, N, C] of the pass that left `state`."""
    real = state.sizes[..., 0] > 0
    if mode == "cls":
        return x[:, 0]
    if mode == "lasttoken":
        return x[torch.arange(len(x), device=x.device), real.sum(dim=1) - 1]
    if mode == "max":
        return x.masked_fill(~real[..., None], float("-inf")).amax(dim=1)
    if mode == "mean":
        return mean_pool(inner, x)
    if mode == "mean_sqrt_len_tokens":  # the sum over sqrt(n) is the mean times sqrt(n)
        return (mean_pool(inner, x).float() * state.sizes.sum(dim=1).sqrt()).to(x.dtype)
    weights = position_weights(state.source, x.shape[1])[..., None]  # weightedmean
    return ((x.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)).to(x.dtype)


class _ReducedPooling:
    """Methods of the Pooling module's class while the SentenceTransformer is patched."""

    def forward(self, features: dict, **kwargs) -> dict:
        owner = self.__dict__[PIPELINE_LINK].owner
        _, inner, _ = _parts(owner)
        x = features["token_embeddings"]
        state = inner._tokenreduce.last_state
        if state is None or state.sizes is None or state.sizes.shape[:2] != x.shape[:2]:
            raise ConfigError(f"token_embeddings of shape {tuple(x.shape)} are not the output of the transformers "
                              "model's last pass; allowed: the features of the SentenceTransformer's own Transformer "
                              "module, run just before")
        owner._tokenreduce.last_state = state
        features["sentence_embedding"] = torch.cat([pool(mode, inner, x, state) for mode in _modes(self)], dim=-1)
        # the mask of the reduced tokens goes to the modules after and to encode; the caller's features keep
        # the input's, as they may be run again (sentence-transformers' cached losses cut them into parts)
        return {**features, "attention_mask": (state.sizes[..., 0] > 0).long()}


def pass_macs(model: nn.Module, state: ReductionState) -> dict[str, int]:
    """MACs of one sentence: those of its transformers model (the pooling has no multiply-adds)."""
    return text_macs(_parts(model)[1], state)


@register_adapter("sentence_transformers")
class SentenceTransformerAdapter(Adapter):
    family = f"sentence-transformers SentenceTransformer ({LAYOUT})"

    def claims(self, model: nn.Module) -> bool:
        # every sentence-transformers model, so one it does not support is refused with the reason
        return _from_sentence_transformers(type(model))

    def describe(self, model: nn.Module) -> ModelInfo:
        return describe(model)

    def pass_macs(self, model: nn.Module, state: ReductionState) -> dict[str, int]:
        return pass_macs(model, state)

    def patch(self, model: nn.Module, reducer, info: ModelInfo, options: dict) -> None:
        _, inner, pooling = _parts(model)
        _text_adapter().patch(inner, reducer, info, {})
        for part in (inner, pooling):
            part.__dict__[PIPELINE_LINK] = _Link(owner=model, original_class=type(part))
        pooling.__class__ = self._reduced_class(type(pooling))
        model._tokenreduce = Patch(adapter=self, original_class=type(model), info=info, options=options)
        model.__class__ = self._reduced_class(type(model))

    def unpatch(self, model: nn.Module) -> None:
        _, inner, pooling = _parts(model)
        model.__class__ = model._tokenreduce.original_class
        del model._tokenreduce
        del inner.__dict__[PIPELINE_LINK]
        pooling.__class__ = pooling.__dict__.pop(PIPELINE_LINK).original_class
        _text_adapter().unpatch(inner)

    def build_reduced_class(self, cls: type) -> type:
        # the methods go into a direct subclass: sentence-transformers' modules derive from ABC, and a class
        # with another base in front of theirs has a layout that __class__ assignment refuses
        methods = _ReducedPooling if issubclass(cls, _classes()[2]) else _ReducedSentenceTransformer
        own = {k: v for k, v in vars(methods).items() if not k.startswith("__")} | {"__module__": __name__}
        return type(f"TokenReduced{cls.__name__}", (cls,), own)


def _text_adapter() -> HFTextAdapter:
    return adapters()["hf_text"]
