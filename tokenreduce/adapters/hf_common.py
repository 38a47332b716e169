"""What the Hugging Face `transformers` adapters share: importing transformers only for its models,
checking a model's layers and attention, the steps of a layer for a reducer (`HFLayerOps`), the
layer loop's view of an encoder (`LayerLoop`), refusing what a reduced pass cannot give, and the
adapter base class whose patched forward keeps the model's own signature (`HFAdapterBase`)."""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tokenreduce.adapters.base import Adapter, ModelInfo
from tokenreduce.core.contract import ATTN, KEYS, Signals
from tokenreduce.core.macs import BlockCost, linear_macs
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnsupportedModelError

INSTALL_HINT = "pip install 'tokenreduce[hf]' (transformers>=5)"
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
# keyword arguments of transformers' forward that a reduced model takes (the rest are refused by name)
PASSED = ("return_dict",)
REFUSED_OUTPUTS = ("output_attentions", "output_hidden_states")


def import_transformers(name: str):
    """A transformers module; a ConfigError saying how to install it when transformers is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"Hugging Face transformers models need the transformers package ({name} could not be "
                          f"imported: {err}); install it with {INSTALL_HINT}") from err


def from_transformers(cls: type) -> bool:
    return any(c.__module__.split(".")[0] == "transformers" for c in cls.__mro__)


def modeling(family: str):
    """transformers' modeling module of `family` (e.g. "bert"); a ConfigError saying how to install it."""
    return import_transformers(f"transformers.models.{family}.modeling_{family}")


def family_class(cls: type, families: dict[str, str]) -> type | None:
    """The class of the modeling modules of `families` (module name -> class-name prefix) that `cls`
    is (or derives from), if it is one of their models; imports transformers."""
    for family, prefix in families.items():
        module = modeling(family)
        if issubclass(cls, getattr(module, f"{prefix}PreTrainedModel")):
            return next(c for c in cls.__mro__ if c.__module__ == module.__name__)
    return None


def spec_of(model: nn.Module, supported: dict[str, tuple[str, str]], class_of) -> tuple[str, str]:
    """(family, head) of a claimed model: `supported`'s entry for the class `class_of` finds for its
    original class."""
    patch = getattr(model, "_tokenreduce", None)
    return supported[class_of(patch.original_class if patch is not None else type(model)).__name__]


def encoder_of(model: nn.Module, head: str) -> nn.Module:
    """The encoder (ViTModel, Dinov2Model, ...) of a model: itself, or its base model."""
    return model if head == "base" else getattr(model, model.base_model_prefix)


# --- checks ---------------------------------------------------------------------------------------
def check_layer_types(name: str, layers: nn.ModuleList, layer_cls: type, attn_cls: type,
                      attention_of: Callable = lambda layer: getattr(layer, "attention", None),
                      more: Callable | None = None) -> None:
    """Every layer is a `layer_cls` whose attention (`attention_of(layer)`) is an `attn_cls`, else an
    UnsupportedModelError naming the layer; `more(i, layer, attention)` checks each layer further."""
    for i, layer in enumerate(layers):
        attention = attention_of(layer)
        if type(layer) is not layer_cls or type(attention) is not attn_cls:
            raise UnsupportedModelError(
                f"model {name} layer {i} is {type(layer).__name__} with {type(attention).__name__}; supported: "
                f"{layer_cls.__name__} with {attn_cls.__name__}")
        if more is not None:
            more(i, layer, attention)


def check_projections(name: str, i: int, layer: nn.Module, attention: nn.Module) -> None:
    """The attention of layer `i` has separate q/k/v/o projections (transformers >= 5)."""
    if any(getattr(attention, p, None) is None for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise UnsupportedModelError(f"model {name} layer {i} has no separate q/k/v/o projections; install "
                                    f"{INSTALL_HINT}")


def check_attention_implementation(name: str, config,
                                   why: str = "proportional attention adds a float mask, which these take") -> None:
    """The model runs `eager` or `sdpa` attention (`why`: what needs it)."""
    impl = config._attn_implementation
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"model {name} uses attn_implementation={impl!r}; supported: {', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))} "
            f"({why})")


# --- one layer -------------------------------------------------------------------------------------
class HFLayerOps:
    """The steps of a transformers ViT/DeiT layer (layernorm_before, attention, dropout, residual,
    layernorm_after, MLP, dropout, residual) or DINOv2 layer (norm1, attention, layer_scale1,
    drop_path, residual, norm2, MLP or SwiGLU, layer_scale2, drop_path, residual) for a reducer."""

    def __init__(self, layer: nn.Module, checkpointing: bool = False):
        self.layer = layer
        self.attn = layer.attention  # the module the attention interface is called with
        self.dinov2 = hasattr(layer, "layer_scale1")
        self.checkpointing = checkpointing
        # the layer's own modules and settings, which other transformers families name differently
        self.projections = (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj)
        self.out = self.attn.o_proj
        self.head_dim, self.scaling, self.dropout = self.attn.head_dim, self.attn.scaling, self.attn.attention_dropout
        self.attention_block, self.mlp_modules = layer.attention, (layer.mlp,)  # what the cost counts

    def cost(self, embed_dim: int) -> BlockCost:
        """The layer's MACs per token, for `stats`."""
        attn_dim = self.projections[0].out_features
        return BlockCost(attn_linear=linear_macs(self.attention_block), attn_dim=attn_dim,
                         mlp_linear=sum(linear_macs(m) for m in self.mlp_modules), qk_linear=2 * embed_dim * attn_dim)

    def _run(self, fn, *args):
        if self.checkpointing:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _heads(self, proj: nn.Linear, h: Tensor) -> Tensor:
        b, n, _ = h.shape
        return proj(h).view(b, n, -1, self.head_dim).transpose(1, 2)

    def _interface(self):
        """The model's attention function for its `_attn_implementation`, as its attention calls it."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = sys.modules[type(self.attn).__module__].eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.attn.config._attn_implementation, eager)

    def _attention_branch(self, h: Tensor, bias: Tensor | None, needs: frozenset[str]) -> tuple[Tensor, Signals]:
        attn = self.attn
        q, k = self.attn_qk(h)
        v = self.attn_values(h)
        signals = Signals()
        if ATTN in needs:
            signals.attn = self.attn_logits(q, k, bias).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            y = self.attn_output(signals.attn, v, h)
        else:
            dropout = self.dropout if attn.training else 0.0
            out, _ = self._interface()(attn, q, k, v, bias, dropout=dropout, scaling=self.scaling)
            y = self.out(out.reshape(*h.shape[:-1], -1).contiguous())
        if KEYS in needs:
            signals.keys = k.mean(dim=1)
        return y, signals

    # --- the steps -----------------------------------------------------------------------------
    def plain(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return self.layer(x, bias)  # the layer checkpoints itself when transformers' checkpointing is on

    def attention(self, x: Tensor, bias: Tensor | None, needs: frozenset[str]) -> tuple[Tensor, Signals]:
        def step(t, m):
            y, sig = self._attention_branch(self.attn_input(t), m, needs)
            return self.attn_residual(t, y), sig.keys, sig.attn

        x, keys, attn = self._run(step, x, bias)
        return x, Signals(keys=keys, attn=attn)

    def mlp(self, x: Tensor) -> Tensor:
        layer = self.layer
        if self.dinov2:
            return self._run(lambda t: layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(t)))) + t, x)
        return self._run(lambda t: layer.dropout(layer.mlp(layer.layernorm_after(t))) + t, x)

    # --- finer steps (see timm_vit.TimmBlockOps) -------------------------------------------------
    @property
    def training(self) -> bool:
        return self.layer.training

    def attn_input(self, x: Tensor) -> Tensor:
        return self.layer.norm1(x) if self.dinov2 else self.layer.layernorm_before(x)

    def attn_qk(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self.projections[0], h), self._heads(self.projections[1], h)

    def attn_values(self, h: Tensor) -> Tensor:
        return self._heads(self.projections[2], h)

    def attn_logits(self, q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        logits = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # as transformers' eager attention
        return logits if bias is None else logits + bias

    def attn_output(self, probs: Tensor, v: Tensor, h: Tensor) -> Tensor:
        out = torch.matmul(F.dropout(probs, p=self.dropout, training=self.attn.training), v)
        return self.out(out.transpose(1, 2).reshape(*h.shape[:-1], -1))

    def attn_residual(self, x: Tensor, y: Tensor) -> Tensor:
        layer = self.layer
        if self.dinov2:
            return layer.drop_path(layer.layer_scale1(y)) + x
        return layer.dropout(y) + x


# --- the patched model -------------------------------------------------------------------------
@dataclass
class LayerLoop:
    """What the block loop (`blocks.run_blocks`) reads from a model, for a transformers encoder's layers."""

    token_reducer: object
    num_prefix_tokens: int
    blocks: nn.ModuleList
    grad_checkpointing: bool
    ops: Callable[[nn.Module, bool], HFLayerOps] = HFLayerOps  # a layer's steps, by the family's layer class

    def _tr_start(self, state: ReductionState, extra) -> None:
        pass  # positions were added to the tokens by the embeddings

    def _tr_block_ops(self, block: nn.Module, state: ReductionState, extra, checkpointing: bool) -> HFLayerOps:
        return self.ops(block, checkpointing)


def bind(original, model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """The named arguments of the model's own forward, and what its **kwargs received."""
    signature = inspect.signature(original)
    arguments = dict(signature.bind(model, *args, **kwargs).arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    var = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    return arguments, dict(arguments.pop(var, {})) if var else {}


def refuse_outputs(model: nn.Module, extra: dict, tower: nn.Module | None = None) -> str:
    """Refuse per-layer outputs (hidden states, attentions) asked by argument or in the config of the
    model (or of `tower`, the part of it that runs the layers); the model's name for the messages that
    follow."""
    who = f"token-reduced {model._tokenreduce.original_class.__name__}"
    for name in REFUSED_OUTPUTS:
        value = extra.get(name)
        if value is None:
            value = getattr(model.config, name, False) or (tower is not None and getattr(tower.config, name, False))
        if value:
            raise ConfigError(
                f"{name}={value!r} is not supported on a {who}: the layers hold fewer tokens after each reduction "
                f"(and the attention of merged tokens is not the model's); allowed: {name}=False (and "
                f"config.{name}=False), or call tokenreduce.remove(model) first")
    return who


def block_costs(layers: nn.ModuleList, embed_dim: int, ops: Callable[[nn.Module], HFLayerOps] = HFLayerOps
                ) -> list[BlockCost]:
    """Every layer's MACs per token, as its steps (`ops`) count them."""
    return [ops(layer).cost(embed_dim) for layer in layers]


class HFAdapterBase(Adapter):
    """An adapter of transformers models. It claims a model whose class comes from transformers and
    that `claimed_class` answers for, and the patched class's `forward` keeps the model's own
    signature and output class, calling the reduced methods' `_tr_forward(original, *args, **kwargs)`.

    A subclass sets `family`, `reduced_methods` and its family's own functions: `claimed_class` (the
    class a model is answered for, None: not claimed), `model_info` (its facts) and `model_macs`.
    """

    claimed_class: ClassVar[Callable[[type], type | None]]
    model_info: ClassVar[Callable[[nn.Module], ModelInfo]]
    model_macs: ClassVar[Callable[[nn.Module, ReductionState], dict[str, int]]]

    def claims(self, model: nn.Module) -> bool:
        # transformers is imported only for a model whose class comes from it
        return from_transformers(type(model)) and self.claimed_class(type(model)) is not None

    def describe(self, model: nn.Module) -> ModelInfo:
        return self.model_info(model)

    def pass_macs(self, model: nn.Module, state: ReductionState) -> dict[str, int]:
        return self.model_macs(model, state)

    def build_reduced_class(self, cls: type) -> type:
        # the model's forward keeps its own signature (inspect follows __wrapped__) and output class
        original = cls.forward

        @functools.wraps(original)
        def forward(model, *args, **kwargs):
            return model._tr_forward(original, *args, **kwargs)

        return type(f"TokenReduced{cls.__name__}", (self.reduced_methods, cls), {"forward": forward})
