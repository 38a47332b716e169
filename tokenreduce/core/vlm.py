"""The contract of the reducers that drop visual tokens inside a vision-language model's language
model during the prefill (FastV, PyramidDrop, DART; docs/vlm.md), and the adapters that place them.

A reducer states its stages: at each, the decoder layer from whose input on the tokens are fewer
(`layer`), the layer whose input its signals are computed from (`signal_layer`, <= `layer`) and the
signals it reads. At every stage the adapter computes those signals on the sequence as it is then
and hands them over in a `PrefillView`; the reducer answers which positions of that sequence stay.
Reducers never import an adapter; the adapter finds these reducers by `is_prefill_reducer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core.contract import ModelInfo
from tokenreduce.errors import ConfigError

# signals a prefill stage may read, each computed at its `signal_layer`
ANCHOR_ATTN = "anchor_attn"  # [B, H, 1, N] the anchor token's attention probabilities over the sequence
LAYER_KEYS = "layer_keys"  # [B, H_kv, N, d] the layer's keys after the rotary embedding
NORMED_OUTPUT = "normed_output"  # [B, N, D] the layer's output through the model's final norm
PREFILL_SIGNALS = frozenset({ANCHOR_ATTN, LAYER_KEYS, NORMED_OUTPUT})


@dataclass(frozen=True)
class LanguageModelInfo(ModelInfo):
    """ModelInfo of a vision-language model whose language model can drop visual tokens.

    `depth` is the number of decoder layers of the language model; `embed_dim` and `num_heads`
    are the language model's. image_token_id: the placeholder id whose positions hold image features.
    """

    image_token_id: int = -1
    num_kv_heads: int = 0
    head_dim: int = 0


@dataclass(frozen=True)
class PrefillStage:
    """One drop: from the input of decoder layer `layer` on, only the positions the reducer keeps
    are there; the signals `needs` are those of decoder layer `signal_layer` (0 <= signal_layer <=
    layer; a signal of the layer's output needs signal_layer < layer)."""

    layer: int
    signal_layer: int
    needs: frozenset[str]


@dataclass
class PrefillView:
    """What a reducer sees of the sequence at one stage (N: the positions still there).

    image_mask: [B, N] bool, the image tokens still there (the same count in every sample)
    anchor:     [B] long, the position of each sample's last prompt token (its query ranks FastV's
                and PyramidDrop's tokens)
    prompt:     [B, N] bool, the prompt's real tokens (not padding, and not tokens generated after the
                prompt, which a pass without the KV cache runs again)
    the signals the stage asked for (None otherwise): see ANCHOR_ATTN, LAYER_KEYS, NORMED_OUTPUT.
    """

    image_mask: Tensor
    anchor: Tensor
    prompt: Tensor
    anchor_attn: Tensor | None = None
    layer_keys: Tensor | None = None
    normed_output: Tensor | None = None


def is_prefill_reducer(reducer) -> bool:
    """Whether `reducer` drops visual tokens inside a language model (it has `prefill_stages`)."""
    return callable(getattr(reducer, "prefill_stages", None))


def require_language_model(who: str, info: ModelInfo) -> LanguageModelInfo:
    """`info` as a LanguageModelInfo; a ConfigError naming `who` for any other model."""
    if not isinstance(info, LanguageModelInfo):
        raise ConfigError(
            f"{who}: drops visual tokens inside the language model of a vision-language model "
            f"(transformers LlavaForConditionalGeneration); model {info.name} is not one; allowed: such a model, "
            "or a reducer for vision encoders such as 'tome' or 'topk'")
    return info


def check_layers(who: str, name: str, value, layers: list[int], info: LanguageModelInfo, low: int = 1) -> None:
    """Every one of `layers` (the parameter `name`, given as `value`) a decoder layer index in
    [low, depth - 1], else a ConfigError naming the model's depth."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= info.depth - 1 for v in layers):
        raise ConfigError(f"{who}: {name}={value!r} is invalid for {info.name}, whose language model has "
                          f"{info.depth} decoder layers; allowed: {'integers' if len(layers) > 1 else 'an integer'} "
                          f"in [{low}, {info.depth - 1}]")
