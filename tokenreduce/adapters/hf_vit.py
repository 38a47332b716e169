"""Placing a reducer into Hugging Face `transformers` (>= 5) vision encoders: ViT, DeiT, DINOv2 and
DINOv2 with registers, as base models and with their image-classification heads.

The patched model keeps its own modules and weights, and its `forward` keeps its signature and its
output class. Only the loop over the layers is replaced, by timm_vit's `run_blocks`: each layer
either runs as transformers defines it (with the proportional-attention bias as its attention mask)
or through its reducer, in the steps of `HFLayerOps`, which call the layer's own submodules. The
attention runs through the model's attention interface (`config._attn_implementation`: "eager" or
"sdpa"); the probabilities are computed here only when a reducer asks for them (ATTN).

Prefix tokens are found from the embeddings: the class token, DeiT's distillation token and
DINOv2's register tokens (`num_register_tokens`), which transformers places right after the class
token. Pooling that averages the patch tokens (DINOv2's classifiers) weights them by size.

`transformers` is imported only when a model's class comes from it, so this module (and every
other adapter) works without it installed.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tokenreduce.adapters.base import _REDUCED_CLASSES, Adapter, ModelInfo, register_adapter
from tokenreduce.adapters.timm_vit import run_blocks, size_weighted_mean
from tokenreduce.core.macs import BlockCost, linear_macs, macs_parts
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnsupportedModelError
from tokenreduce.reducers.base import ATTN, KEYS, Signals

INSTALL_HINT = "pip install 'tokenreduce[hf]' (transformers>=5)"
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
# transformers' model family (its module under transformers.models) -> the prefix of its class names
FAMILIES = {"vit": "ViT", "deit": "DeiT", "dinov2": "Dinov2", "dinov2_with_registers": "Dinov2WithRegisters"}
# supported class -> (family, head): "base" the encoder itself, "token" a classifier of the class token,
# "teacher" DeiT's class and distillation classifiers, "token_mean" the class token and the patch mean
SUPPORTED = {
    "ViTModel": ("vit", "base"),
    "ViTForImageClassification": ("vit", "token"),
    "DeiTModel": ("deit", "base"),
    "DeiTForImageClassification": ("deit", "token"),
    "DeiTForImageClassificationWithTeacher": ("deit", "teacher"),
    "Dinov2Model": ("dinov2", "base"),
    "Dinov2ForImageClassification": ("dinov2", "token_mean"),
    "Dinov2WithRegistersModel": ("dinov2_with_registers", "base"),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "token_mean"),
}
# what transformers is imported for (a test sets these to None to act as if it were not installed)
MODULES = ("transformers.modeling_utils", "transformers.modeling_outputs",
           *(f"transformers.models.{f}.modeling_{f}" for f in FAMILIES))
# keyword arguments of transformers' forward that a reduced model takes (the rest are refused by name)
PASSED = ("return_dict",)
REFUSED_OUTPUTS = ("output_attentions", "output_hidden_states")


def _import(name: str):
    """A transformers module; a ConfigError saying how to install it when transformers is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"Hugging Face transformers models need the transformers package ({name} could not be "
                          f"imported: {err}); install it with {INSTALL_HINT}") from err


def _from_transformers(cls: type) -> bool:
    return any(c.__module__.split(".")[0] == "transformers" for c in cls.__mro__)


def modeling(family: str):
    """transformers' modeling module of `family` (e.g. "bert"); a ConfigError saying how to install it."""
    return _import(f"transformers.models.{family}.modeling_{family}")


def family_class(cls: type, families: dict[str, str]) -> type | None:
    """The class of the modeling modules of `families` (module name -> class-name prefix) that `cls`
    is (or derives from), if it is one of their models; imports transformers."""
    for family, prefix in families.items():
        module = modeling(family)
        if issubclass(cls, getattr(module, f"{prefix}PreTrainedModel")):
            return next(c for c in cls.__mro__ if c.__module__ == module.__name__)
    return None


def _supported_class(cls: type) -> type | None:
    """The supported transformers class `cls` is (or derives from), or None; imports transformers."""
    for family in FAMILIES:
        _import(f"transformers.models.{family}.modeling_{family}")
    for c in cls.__mro__:
        spec = SUPPORTED.get(c.__name__)
        if spec is not None and c.__module__ == f"transformers.models.{spec[0]}.modeling_{spec[0]}":
            return c
    return None


def spec_of(model: nn.Module, supported: dict[str, tuple[str, str]], class_of) -> tuple[str, str]:
    """(family, head) of a claimed model: `supported`'s entry for the class `class_of` finds for its
    original class."""
    patch = getattr(model, "_tokenreduce", None)
    return supported[class_of(patch.original_class if patch is not None else type(model)).__name__]


def _spec(model: nn.Module) -> tuple[str, str]:
    """(family, head) of a claimed model, from its original class."""
    return spec_of(model, SUPPORTED, _supported_class)


def _encoder(model: nn.Module, head: str) -> nn.Module:
    """The encoder (ViTModel, Dinov2Model, ...) of a model: itself, or its base model."""
    return model if head == "base" else getattr(model, model.base_model_prefix)


def _layers(encoder: nn.Module) -> nn.ModuleList:
    """The transformer layers: `layers` (ViT, DeiT) or `encoder.layer` (DINOv2)."""
    layers = getattr(encoder, "layers", None)
    return layers if layers is not None else encoder.encoder.layer


def _num_prefix(encoder: nn.Module) -> int:
    """Class token, then DeiT's distillation token or DINOv2's register tokens."""
    embeddings = encoder.embeddings
    registers = getattr(embeddings, "register_tokens", None)
    return (1 + (getattr(embeddings, "distillation_token", None) is not None)
            + (0 if registers is None else registers.shape[1]))


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


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not."""
    cls = _supported_class(type(model)) if _from_transformers(type(model)) else None
    if cls is None:
        raise UnsupportedModelError(f"model {type(model).__name__} is not a supported Hugging Face transformers model; "
                                    f"supported: {', '.join(SUPPORTED)}")
    family, head = SUPPORTED[cls.__name__]
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    module = sys.modules[f"transformers.models.{family}.modeling_{family}"]
    encoder = _encoder(model, head)
    layers = getattr(encoder, "layers", None) or getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None or getattr(encoder, "embeddings", None) is None or getattr(encoder, "layernorm", None) is None:
        raise UnsupportedModelError(f"model {name} ({type(model).__name__}) lacks the layout of transformers>=5 "
                                    f"(embeddings, layers, layernorm); install {INSTALL_HINT}")
    check_layer_types(name, layers, getattr(module, f"{FAMILIES[family]}Layer"),
                      getattr(module, f"{FAMILIES[family]}Attention"), more=functools.partial(check_projections, name))
    check_attention_implementation(name, model.config)
    return ModelInfo(name=name, depth=len(layers), num_prefix=_num_prefix(encoder), has_class_token=True,
                     embed_dim=model.config.hidden_size, num_heads=model.config.num_attention_heads)


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
class _Loop:
    """What timm_vit's `run_blocks` reads from a model, for a transformers encoder's layers."""

    token_reducer: object
    num_prefix_tokens: int
    blocks: nn.ModuleList
    grad_checkpointing: bool
    ops: Callable[[nn.Module, bool], HFLayerOps] = HFLayerOps  # a layer's steps, by the family's layer class

    def _tr_start(self, state: ReductionState, extra) -> None:
        pass  # positions were added to the tokens by the embeddings

    def _tr_block_ops(self, block: nn.Module, state: ReductionState, extra, checkpointing: bool) -> HFLayerOps:
        return self.ops(block, checkpointing)


def _bind(original, model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
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


def _check_arguments(model: nn.Module, arguments: dict, extra: dict) -> None:
    """Refuse, before any compute, what a reduced pass cannot give, naming the argument."""
    who = refuse_outputs(model, extra)
    unknown = sorted(set(extra) - set(PASSED) - set(REFUSED_OUTPUTS))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} not supported on a {who}; allowed: the named arguments of its "
                          "forward (pixel_values, labels, interpolate_pos_encoding, bool_masked_pos where it has "
                          "them) and return_dict")
    if arguments.get("attention_mask") is not None:
        raise ConfigError(f"attention_mask is not supported on a {who}: merged tokens no longer line up with a mask "
                          "over the input tokens; allowed: attention_mask=None, or call tokenreduce.remove(model) first")
    if arguments.get("pixel_values") is None:
        raise ConfigError(f"pixel_values=None is invalid for a {who}; allowed: a [B, C, H, W] tensor")


class _ReducedHFViT:
    """Methods placed in front of the model's own class by `patch` (the adapter adds a `forward` that
    keeps the class's own signature and calls `_tr_forward`)."""

    def _tr_forward(self, original, *args, **kwargs):
        arguments, extra = _bind(original, self, args, kwargs)
        _check_arguments(self, arguments, extra)
        family, head = _spec(self)
        encoder = _encoder(self, head)
        pixel_values = arguments["pixel_values"]
        pixel_values = pixel_values.to(encoder.embeddings.patch_embeddings.projection.weight.dtype)
        embed_kwargs = {"bool_masked_pos": arguments.get("bool_masked_pos")}
        if family in ("vit", "deit"):
            embed_kwargs["interpolate_pos_encoding"] = arguments.get("interpolate_pos_encoding")
        x = encoder.embeddings(pixel_values, **embed_kwargs)

        layers = _layers(encoder)
        num_prefix = self._tokenreduce.info.num_prefix
        checkpointing = bool(layers[0].gradient_checkpointing) and layers[0].training
        loop = _Loop(self.token_reducer, num_prefix, layers, checkpointing)
        x, state, _ = run_blocks(loop, x, None)
        self._tokenreduce.last_state = state
        sequence = encoder.layernorm(x)

        output = self._tr_outputs(family, head, encoder, sequence, state, arguments.get("labels"))
        return_dict = extra.get("return_dict")
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _tr_outputs(self, family: str, head: str, encoder: nn.Module, sequence: Tensor, state: ReductionState,
                    labels: Tensor | None):
        outputs = _import("transformers.modeling_outputs")
        if head == "base":
            if family in ("vit", "deit"):
                pooled = encoder.pooler(sequence) if encoder.pooler is not None else None
            else:
                pooled = sequence[:, 0, :]
            return outputs.BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled)
        if head == "teacher":
            cls_logits = self.cls_classifier(sequence[:, 0, :])
            distillation_logits = self.distillation_classifier(sequence[:, 1, :])
            module = sys.modules[type(encoder).__module__]
            return module.DeiTForImageClassificationWithTeacherOutput(
                logits=(cls_logits + distillation_logits) / 2, cls_logits=cls_logits,
                distillation_logits=distillation_logits)
        if head == "token":
            logits = self.classifier(sequence[:, 0, :])
        else:  # the class token and the mean of the patch tokens, weighted by their sizes
            prefix = self._tokenreduce.info.num_prefix
            patches = sequence[:, prefix:]
            sizes = state.sizes
            mean = patches.mean(dim=1) if sizes is None else size_weighted_mean(patches, sizes[:, prefix:])
            logits = self.classifier(torch.cat([sequence[:, 0], mean], dim=1))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return outputs.ImageClassifierOutput(loss=loss, logits=logits)


# --- cost --------------------------------------------------------------------------------------
def block_costs(layers: nn.ModuleList, embed_dim: int, ops: Callable[[nn.Module], HFLayerOps] = HFLayerOps
                ) -> list[BlockCost]:
    """Every layer's MACs per token, as its steps (`ops`) count them."""
    return [ops(layer).cost(embed_dim) for layer in layers]


def pass_macs(model: nn.Module, state: ReductionState) -> dict[str, int]:
    """MACs of one image for the pass that left `state`, split by where they are spent."""
    family, head = _spec(model)
    encoder = _encoder(model, head)
    num_patches = state.records[0].tokens_in - model._tokenreduce.info.num_prefix
    embed = num_patches * encoder.embeddings.patch_embeddings.projection.weight.numel()
    costs = block_costs(_layers(encoder), model.config.hidden_size)
    if head == "base":
        heads = [getattr(encoder, "pooler", None)]
    elif head == "teacher":
        heads = [model.cls_classifier, model.distillation_classifier]
    else:
        heads = [model.classifier]
    head_macs = sum(linear_macs(m) for m in heads if m is not None)
    return macs_parts(embed, costs, state.records, head_macs)


@register_adapter("hf_vit")
class HFViTAdapter(Adapter):
    family = f"Hugging Face transformers vision encoders ({', '.join(SUPPORTED)})"
    reduced_methods = _ReducedHFViT
    # a transformers family's own functions: the class a model is answered for (None: not claimed),
    # its facts and its MACs; the other transformers adapters set theirs
    claimed_class = staticmethod(_supported_class)
    model_info = staticmethod(describe)
    model_macs = staticmethod(pass_macs)

    def claims(self, model: nn.Module) -> bool:
        # transformers is imported only for a model whose class comes from it
        return _from_transformers(type(model)) and self.claimed_class(type(model)) is not None

    def describe(self, model: nn.Module) -> ModelInfo:
        return self.model_info(model)

    def pass_macs(self, model: nn.Module, state: ReductionState) -> dict[str, int]:
        return self.model_macs(model, state)

    def _reduced_class(self, cls: type) -> type:
        # the model's forward keeps its own signature (inspect follows __wrapped__) and output class
        key = (self.name, cls)
        if key not in _REDUCED_CLASSES:
            original = cls.forward

            @functools.wraps(original)
            def forward(model, *args, **kwargs):
                return model._tr_forward(original, *args, **kwargs)

            _REDUCED_CLASSES[key] = type(f"TokenReduced{cls.__name__}", (self.reduced_methods, cls),
                                         {"forward": forward})
        return _REDUCED_CLASSES[key]
