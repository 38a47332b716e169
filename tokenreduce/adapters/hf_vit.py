"""Placing a reducer into Hugging Face `transformers` (>= 5) vision encoders: ViT, DeiT, DINOv2 and
DINOv2 with registers, as base models and with their image-classification heads.

The patched model keeps its own modules and weights, and its `forward` keeps its signature and its
output class. Only the loop over the layers is replaced, by the block loop `run_blocks`: each layer
either runs as transformers defines it (with the proportional-attention bias as its attention mask)
or through its reducer, in the steps of `hf_common.HFLayerOps`, which call the layer's own submodules. The
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
import sys

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import ModelInfo, register_adapter
from tokenreduce.adapters.blocks import run_blocks, size_weighted_mean
from tokenreduce.adapters.hf_common import (
    INSTALL_HINT,
    PASSED,
    REFUSED_OUTPUTS,
    HFAdapterBase,
    HFLayerOps,  # noqa: F401  (re-exported: the steps of this family's layers)
    LayerLoop,
    bind,
    block_costs,
    check_attention_implementation,
    check_layer_types,
    check_projections,
    encoder_of,
    from_transformers,
    import_transformers,
    refuse_outputs,
    spec_of,
)
from tokenreduce.core.macs import linear_macs, macs_parts
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnsupportedModelError

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


def _supported_class(cls: type) -> type | None:
    """The supported transformers class `cls` is (or derives from), or None; imports transformers."""
    for family in FAMILIES:
        import_transformers(f"transformers.models.{family}.modeling_{family}")
    for c in cls.__mro__:
        spec = SUPPORTED.get(c.__name__)
        if spec is not None and c.__module__ == f"transformers.models.{spec[0]}.modeling_{spec[0]}":
            return c
    return None


def _spec(model: nn.Module) -> tuple[str, str]:
    """(family, head) of a claimed model, from its original class."""
    return spec_of(model, SUPPORTED, _supported_class)


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


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not."""
    cls = _supported_class(type(model)) if from_transformers(type(model)) else None
    if cls is None:
        raise UnsupportedModelError(f"model {type(model).__name__} is not a supported Hugging Face transformers model; "
                                    f"supported: {', '.join(SUPPORTED)}")
    family, head = SUPPORTED[cls.__name__]
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    module = sys.modules[f"transformers.models.{family}.modeling_{family}"]
    encoder = encoder_of(model, head)
    layers = getattr(encoder, "layers", None) or getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None or getattr(encoder, "embeddings", None) is None or getattr(encoder, "layernorm", None) is None:
        raise UnsupportedModelError(f"model {name} ({type(model).__name__}) lacks the layout of transformers>=5 "
                                    f"(embeddings, layers, layernorm); install {INSTALL_HINT}")
    check_layer_types(name, layers, getattr(module, f"{FAMILIES[family]}Layer"),
                      getattr(module, f"{FAMILIES[family]}Attention"), more=functools.partial(check_projections, name))
    check_attention_implementation(name, model.config)
    return ModelInfo(name=name, depth=len(layers), num_prefix=_num_prefix(encoder), has_class_token=True,
                     embed_dim=model.config.hidden_size, num_heads=model.config.num_attention_heads)


# --- the patched model -------------------------------------------------------------------------


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
        arguments, extra = bind(original, self, args, kwargs)
        _check_arguments(self, arguments, extra)
        family, head = _spec(self)
        encoder = encoder_of(self, head)
        pixel_values = arguments["pixel_values"]
        pixel_values = pixel_values.to(encoder.embeddings.patch_embeddings.projection.weight.dtype)
        embed_kwargs = {"bool_masked_pos": arguments.get("bool_masked_pos")}
        if family in ("vit", "deit"):
            embed_kwargs["interpolate_pos_encoding"] = arguments.get("interpolate_pos_encoding")
        x = encoder.embeddings(pixel_values, **embed_kwargs)

        layers = _layers(encoder)
        num_prefix = self._tokenreduce.info.num_prefix
        checkpointing = bool(layers[0].gradient_checkpointing) and layers[0].training
        loop = LayerLoop(self.token_reducer, num_prefix, layers, checkpointing)
        x, state, _ = run_blocks(loop, x, None)
        self._tokenreduce.last_state = state
        sequence = encoder.layernorm(x)

        output = self._tr_outputs(family, head, encoder, sequence, state, arguments.get("labels"))
        return_dict = extra.get("return_dict")
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _tr_outputs(self, family: str, head: str, encoder: nn.Module, sequence: Tensor, state: ReductionState,
                    labels: Tensor | None):
        outputs = import_transformers("transformers.modeling_outputs")
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
def pass_macs(model: nn.Module, state: ReductionState) -> dict[str, int]:
    """MACs of one image for the pass that left `state`, split by where they are spent."""
    family, head = _spec(model)
    encoder = encoder_of(model, head)
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
class HFViTAdapter(HFAdapterBase):
    family = f"Hugging Face transformers vision encoders ({', '.join(SUPPORTED)})"
    reduced_methods = _ReducedHFViT
    # a transformers family's own functions: the class a model is answered for (None: not claimed),
    # its facts and its MACs; the other transformers adapters set theirs
    claimed_class = staticmethod(_supported_class)
    model_info = staticmethod(describe)
    model_macs = staticmethod(pass_macs)
