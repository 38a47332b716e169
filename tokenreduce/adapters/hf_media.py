"""Placing a reducer into Hugging Face `transformers` (>= 5) video and audio encoders: VideoMAE
(`VideoMAEModel`, `VideoMAEForVideoClassification`) and the Audio Spectrogram Transformer (`ASTModel`,
`ASTForAudioClassification`).

As in hf_vit, the patched model keeps its modules, weights, the signature of its `forward` and its
output class; the loop over the layers is hf_vit's (the block loop `run_blocks`), each layer running as
transformers defines it or through its reducer in the steps of an `HFLayerOps`.

VideoMAE: tubelet patch embedding (a Conv3d over frames), fixed sinusoidal positions added by the
embeddings, no class token (no prefix tokens). Its layers keep the older ViT layout (`attention.attention`
with query/key/value, `attention.output.dense`, `intermediate`, `output`) and take no attention mask,
so a layer that must see the proportional-attention bias runs through `VideoMAELayerOps`. The
classifier's mean over the tokens (before `fc_norm`) weights each token by its size. Masked
pre-training (`bool_masked_pos`, `VideoMAEForPreTraining`) is refused: the caller's mask chooses the
tokens, and a reducer would change which remain for the decoder.

AST: a class token and a distillation token (2 prefix tokens), then the spectrogram patches; its
layers have ViT's layout of transformers>=5, so `hf_common.HFLayerOps` runs them. The pooled output is
the mean of the two prefix tokens, which no reducer merges or drops.

`transformers` is imported only when a model's class comes from it (as in hf_vit).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from tokenreduce.adapters.base import ModelInfo, register_adapter
from tokenreduce.adapters.blocks import run_blocks, size_weighted_mean
from tokenreduce.adapters.hf_common import (
    INSTALL_HINT,
    PASSED,
    REFUSED_OUTPUTS,
    HFAdapterBase,
    HFLayerOps,
    LayerLoop,
    bind,
    block_costs,
    check_attention_implementation,
    check_layer_types,
    check_projections,
    family_class,
    from_transformers,
    import_transformers,
    modeling,
    refuse_outputs,
    spec_of,
)
from tokenreduce.core.macs import linear_macs, macs_parts
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnclaimedModelError, UnsupportedModelError

# transformers' model family (its module under transformers.models) -> the prefix of its class names
FAMILIES = {"videomae": "VideoMAE", "audio_spectrogram_transformer": "AST"}
# supported class -> (family, head): "base" the encoder itself, "mean" VideoMAE's classifier of the token
# mean, "pooled" AST's classifier of the mean of its class and distillation tokens
SUPPORTED = {
    "VideoMAEModel": ("videomae", "base"),
    "VideoMAEForVideoClassification": ("videomae", "mean"),
    "ASTModel": ("audio_spectrogram_transformer", "base"),
    "ASTForAudioClassification": ("audio_spectrogram_transformer", "pooled"),
}
INPUTS = {"videomae": "pixel_values", "audio_spectrogram_transformer": "input_values"}
NUM_PREFIX = {"videomae": 0, "audio_spectrogram_transformer": 2}
MODULES = ("transformers.modeling_outputs", *(f"transformers.models.{f}.modeling_{f}" for f in FAMILIES))
MASKED_REASON = ("masked pre-training (bool_masked_pos) keeps the tubelets the caller chose, and the decoder "
                 "reconstructs the others by position; a reducer would change which tokens remain")


def _family_class(cls: type) -> type | None:
    """The VideoMAE or AST model class `cls` is (or derives from), or None."""
    return family_class(cls, FAMILIES)


def _spec(model: nn.Module) -> tuple[str, str]:
    """(family, head) of a claimed model, from its original class."""
    return spec_of(model, SUPPORTED, _family_class)


def _encoder(model: nn.Module, head: str) -> nn.Module:
    return model if head == "base" else getattr(model, model.base_model_prefix, None)


def _layers(encoder: nn.Module) -> nn.ModuleList | None:
    """The layers: `encoder.layer` (VideoMAE) or `layers` (AST)."""
    layers = getattr(encoder, "layers", None)
    return layers if layers is not None else getattr(getattr(encoder, "encoder", None), "layer", None)


def _check_layers(family: str, name: str, layers: nn.ModuleList) -> None:
    module, prefix = modeling(family), FAMILIES[family]

    def videomae_layout(i: int, layer: nn.Module, attention: nn.Module) -> None:
        inner = getattr(attention, "attention", None)
        if (type(inner) is not module.VideoMAESelfAttention or type(attention.output) is not module.VideoMAESelfOutput
                or type(layer.intermediate) is not module.VideoMAEIntermediate
                or type(layer.output) is not module.VideoMAEOutput):
            raise UnsupportedModelError(f"model {name} layer {i} lacks VideoMAE's layout (attention.attention "
                                        "query/key/value, attention.output.dense, intermediate, output); install "
                                        f"{INSTALL_HINT}")

    check_layer_types(name, layers, getattr(module, f"{prefix}Layer"), getattr(module, f"{prefix}Attention"),
                      more=videomae_layout if family == "videomae" else partial(check_projections, name))


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not (a VideoMAE
    or AST class that it does not support: UnclaimedModelError, which is also a ConfigError)."""
    cls = _family_class(type(model)) if from_transformers(type(model)) else None
    if cls is None:
        raise UnsupportedModelError(f"model {type(model).__name__} is not a Hugging Face transformers VideoMAE or AST "
                                    f"model; supported: {', '.join(SUPPORTED)}")
    supported = ", ".join(SUPPORTED)
    if cls.__name__ not in SUPPORTED:
        reason = f": {MASKED_REASON}" if "PreTraining" in cls.__name__ else ""
        raise UnclaimedModelError(f"model {type(model).__name__} ({cls.__name__}) is not supported by the VideoMAE/AST "
                                  f"adapter{reason}; supported: {supported}")
    family, head = SUPPORTED[cls.__name__]
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    encoder = _encoder(model, head)
    layers = None if encoder is None else _layers(encoder)
    if layers is None or getattr(encoder, "embeddings", None) is None or not hasattr(encoder, "layernorm"):
        raise UnsupportedModelError(f"model {name} ({type(model).__name__}) lacks the layout of transformers>=5 "
                                    f"(embeddings, layers, layernorm); install {INSTALL_HINT}")
    _check_layers(family, name, layers)
    if head == "mean" and getattr(model, "fc_norm", None) is None:
        raise UnsupportedModelError(
            f"model {name} classifies its first token (use_mean_pooling=False), a patch token that a reducer may "
            "merge or drop (VideoMAE has no class token); supported: use_mean_pooling=True (the mean of the tokens)")
    check_attention_implementation(name, model.config)
    prefix = NUM_PREFIX[family]
    return ModelInfo(name=name, depth=len(layers), num_prefix=prefix, has_class_token=prefix > 0,
                     embed_dim=model.config.hidden_size, num_heads=model.config.num_attention_heads)


# --- one layer -------------------------------------------------------------------------------------
class VideoMAELayerOps(HFLayerOps):
    """The steps of a VideoMAE layer (layernorm_before, attention.attention with query/key/value,
    attention.output's dense and dropout, residual, layernorm_after, intermediate, output with its
    residual) for a reducer. VideoMAE's layers take no attention mask: with the proportional-attention
    bias a plain layer runs through these steps (the attention interface with the bias as its mask)."""

    def __init__(self, layer: nn.Module, checkpointing: bool = False):
        self.layer = layer
        self.attn = layer.attention.attention  # the module the attention interface is called with
        self.dinov2 = False
        self.checkpointing = checkpointing
        self.projections = (self.attn.query, self.attn.key, self.attn.value)
        self.head_dim, self.scaling, self.dropout = self.attn.attention_head_size, self.attn.scaling, self.attn.dropout_prob
        self.attention_block, self.mlp_modules = layer.attention, (layer.intermediate, layer.output)

    def out(self, h: Tensor) -> Tensor:
        return self.layer.attention.output(h, None)  # dense, then the hidden dropout

    def plain(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            return self.layer(x)  # the layer checkpoints itself when transformers' checkpointing is on
        x, _ = self.attention(x, bias, frozenset())
        return self.mlp(x)

    def mlp(self, x: Tensor) -> Tensor:
        layer = self.layer
        return self._run(lambda t: layer.output(layer.intermediate(layer.layernorm_after(t)), t), x)

    def attn_residual(self, x: Tensor, y: Tensor) -> Tensor:
        return y + x


def layer_ops(layer: nn.Module, checkpointing: bool = False) -> HFLayerOps:
    """A layer's steps: VideoMAE's own, AST's as hf_vit's."""
    return (VideoMAELayerOps if hasattr(layer, "intermediate") else HFLayerOps)(layer, checkpointing)


# --- the patched model -------------------------------------------------------------------------
def _check_arguments(model: nn.Module, family: str, arguments: dict, extra: dict) -> None:
    """Refuse, before any compute, what a reduced pass cannot give, naming the argument."""
    who = refuse_outputs(model, extra)
    masked = arguments.get("bool_masked_pos", extra.get("bool_masked_pos"))
    if masked is not None:
        raise ConfigError(f"bool_masked_pos is not supported on a {who}: {MASKED_REASON}; allowed: "
                          "bool_masked_pos=None, or call tokenreduce.remove(model) first")
    unknown = sorted(set(extra) - set(PASSED) - set(REFUSED_OUTPUTS) - {"bool_masked_pos"})
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} not supported on a {who}; allowed: the named arguments of its "
                          f"forward ({INPUTS[family]}, labels where it has them) and return_dict")
    if arguments.get("attention_mask") is not None:
        raise ConfigError(f"attention_mask is not supported on a {who}: merged tokens no longer line up with a mask "
                          "over the input tokens; allowed: attention_mask=None, or call tokenreduce.remove(model) first")
    if arguments.get(INPUTS[family]) is None:
        shape = "[B, T, C, H, W]" if family == "videomae" else "[B, time, mel bins]"
        raise ConfigError(f"{INPUTS[family]}=None is invalid for a {who}; allowed: a {shape} tensor")


class _ReducedMedia:
    """Methods placed in front of the model's own class by `patch` (the adapter adds a `forward` that
    keeps the class's own signature and calls `_tr_forward`)."""

    def _tr_forward(self, original, *args, **kwargs):
        arguments, extra = bind(original, self, args, kwargs)
        family, head = _spec(self)
        _check_arguments(self, family, arguments, extra)
        encoder = _encoder(self, head)
        values = arguments[INPUTS[family]]
        x = encoder.embeddings(values, None) if family == "videomae" else encoder.embeddings(values)

        layers = _layers(encoder)
        checkpointing = bool(layers[0].gradient_checkpointing) and layers[0].training
        loop = LayerLoop(self.token_reducer, self._tokenreduce.info.num_prefix, layers, checkpointing, layer_ops)
        x, state, _ = run_blocks(loop, x, None)
        self._tokenreduce.last_state = state
        sequence = x if encoder.layernorm is None else encoder.layernorm(x)

        output = self._tr_outputs(family, head, sequence, state, arguments.get("labels"))
        return_dict = extra.get("return_dict")
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _tr_outputs(self, family: str, head: str, sequence: Tensor, state: ReductionState, labels: Tensor | None):
        outputs = import_transformers("transformers.modeling_outputs")
        if family == "videomae":
            if head == "base":
                return outputs.BaseModelOutput(last_hidden_state=sequence)
            sizes = state.sizes  # the mean of the tokens, each weighted by its size
            mean = sequence.mean(1) if sizes is None else size_weighted_mean(sequence, sizes)
            logits = self.classifier(self.fc_norm(mean))
            loss = None if labels is None else self.loss_function(labels, logits, self.config)
            return outputs.ImageClassifierOutput(loss=loss, logits=logits)
        pooled = (sequence[:, 0] + sequence[:, 1]) / 2  # the class and distillation tokens, as transformers
        if head == "base":
            return outputs.BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled)
        logits = self.classifier(pooled)
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return outputs.SequenceClassifierOutput(loss=loss, logits=logits)


# --- cost --------------------------------------------------------------------------------------
def pass_macs(model: nn.Module, state: ReductionState) -> dict[str, int]:
    """MACs of one clip (or spectrogram) for the pass that left `state`, split by where they are spent."""
    family, head = _spec(model)
    encoder = _encoder(model, head)
    num_patches = state.records[0].tokens_in - model._tokenreduce.info.num_prefix
    embed = num_patches * encoder.embeddings.patch_embeddings.projection.weight.numel()
    costs = block_costs(_layers(encoder), model.config.hidden_size, layer_ops)
    return macs_parts(embed, costs, state.records, 0 if head == "base" else linear_macs(model.classifier))


@register_adapter("hf_media")
class HFMediaAdapter(HFAdapterBase):
    family = f"Hugging Face transformers video and audio encoders ({', '.join(SUPPORTED)})"
    reduced_methods = _ReducedMedia

    # every model of these families, so a class it does not support is refused with the reason
    claimed_class = staticmethod(_family_class)
    model_info = staticmethod(describe)
    model_macs = staticmethod(pass_macs)

