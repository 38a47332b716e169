"""The contract of the reducers that cut visual tokens of a vision-language model (docs/vlm.md), and
the adapters that place them. Two kinds:

- prefill reducers (FastV, PyramidDrop, DART) drop visual tokens inside the language model during
  the prefill (placement (c)); described below;
- boundary reducers (VisionZip, PruMerge, PruMerge+) shrink each image's features from V to k
  tokens between the vision tower and the projector (placement (b)): the adapter computes the
  signals they name (`boundary_needs()`) in the vision tower, hands them over in a `BoundaryView`,
  and the reducer answers with the new tokens (`reduce_features(view) -> BoundaryTokens`); the
  adapter projects them and shortens each image's placeholder run to its k.

A reducer states its stages: at each, the decoder layer from whose input on the tokens are fewer
(`layer`), the layer whose input its signals are computed from (`signal_layer`, <= `layer`) and the
signals it reads. At every stage the adapter computes those signals on the sequence as it is then
and hands them over in a `PrefillView`; the reducer answers which positions of that sequence stay
(a [B, M] tensor of positions, or a `PrefillKeep` when it also replaces states, keeps a different
number per sample, or marks positions for its later stages: SparseVLM).
Reducers never import an adapter; the adapter finds these reducers by `is_prefill_reducer`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor

from tokenreduce.core.contract import ModelInfo
from tokenreduce.errors import ConfigError

# signals a prefill stage may read, each computed at its `signal_layer`
ANCHOR_ATTN = "anchor_attn"  # [B, H, 1, N] the anchor token's attention probabilities over the sequence
LAYER_KEYS = "layer_keys"  # [B, H_kv, N, d] the layer's keys after the rotary embedding
NORMED_OUTPUT = "normed_output"  # [B, N, D] the layer's output through the model's final norm
TEXT_ATTN = "text_attn"  # [B, H, T, N] the attention probabilities of each sample's text rows (PrefillView.text)
HIDDEN = "hidden"  # [B, N, D] the hidden states entering the stage's layer (the previous layer's output)
EMBEDDINGS = "embeddings"  # [B, N, D] the language model's input (decoder layer 0's input) at the current positions
PREFILL_SIGNALS = frozenset({ANCHOR_ATTN, LAYER_KEYS, NORMED_OUTPUT, TEXT_ATTN, HIDDEN, EMBEDDINGS})


# signals a boundary reducer may read, computed in the vision tower from one pass over the images
CLS_ATTENTION = "cls_attention"  # [I, H, N] the CLS query's attention probabilities in the feature layer, per head
FEATURE_KEYS = "feature_keys"  # [I, H, N, d] the feature layer's keys, per head
NEXT_CLS_ATTENTION = "next_cls_attention"  # [I, N] softmax(q_cls k^T / sqrt(C)) of the next layer's q/k taken whole
NEXT_KEYS = "next_keys"  # [I, N, C] the next layer's key projection of the features (heads side by side)
BOUNDARY_SIGNALS = frozenset({CLS_ATTENTION, FEATURE_KEYS, NEXT_CLS_ATTENTION, NEXT_KEYS})


@dataclass(frozen=True)
class LanguageModelInfo(ModelInfo):
    """ModelInfo of a vision-language model whose language model can drop visual tokens.

    `depth` is the number of decoder layers of the language model; `embed_dim` and `num_heads`
    are the language model's. image_token_id: the placeholder id whose positions hold image features.
    The vision tower (for boundary reducers; 0 where it is not a supported one): `vision_tokens`
    tokens per image (`vision_prefix` CLS tokens first, then the patches), `vision_depth` encoder
    layers, `feature_layer` the index of the encoder layer whose output the projector reads
    (LLaVA's vision_feature_layer -2 is the second-to-last layer), `feature_prefix` whether the
    model's features keep the CLS token (vision_feature_select_strategy "full") or not ("default").
    """

    image_token_id: int = -1
    num_kv_heads: int = 0
    head_dim: int = 0
    vision_tokens: int = 0
    vision_prefix: int = 1
    vision_depth: int = 0
    feature_layer: int = -1
    feature_prefix: bool = False

    @property
    def image_patches(self) -> int:
        """Patch tokens per image (the tower's tokens without its CLS)."""
        return self.vision_tokens - self.vision_prefix

    @property
    def image_features(self) -> int:
        """Tokens per image the unreduced model hands the language model."""
        return self.vision_tokens if self.feature_prefix else self.image_patches


@dataclass(frozen=True)
class PrefillStage:
    """One drop: from the input of decoder layer `layer` on, only the positions the reducer keeps
    are there; the signals `needs` are those of decoder layer `signal_layer` (0 <= signal_layer <=
    layer; a signal of the layer's output needs signal_layer < layer)."""

    layer: int
    signal_layer: int
    needs: frozenset[str]
    renumber: bool = False  # from this layer on each kept token's position drops by the tokens dropped before it


@dataclass
class PrefillView:
    """What a reducer sees of the sequence at one stage (N: the positions still there).

    image_mask: [B, N] bool, the image tokens still there (the same count in every sample, unless an
                earlier stage of a reducer that keeps per-sample counts (SparseVLM) made them differ;
                samples that hold different counts from the start are given to the reducer one by one)
    anchor:     [B] long, the position of each sample's last prompt token (its query ranks FastV's
                and PyramidDrop's tokens)
    prompt:     [B, N] bool, the prompt's real tokens (not padding, and not tokens generated after the
                prompt, which a pass without the KV cache runs again)
    marks:      [B, N] bool, what the reducer marked at an earlier stage of this pass (PrefillKeep.marks,
                carried along with the positions), or None
    text:       [B, T] long, with TEXT_ATTN: each sample's text tokens, the real prompt tokens after its
                last image token, ascending, then -1 (T: the most of any sample)
    the signals the stage asked for (None otherwise): see ANCHOR_ATTN, LAYER_KEYS, NORMED_OUTPUT,
    TEXT_ATTN (rows of `text`; zeros at -1), HIDDEN, EMBEDDINGS.
    Positions a stage left as padding slots (PrefillKeep) are neither image nor prompt tokens.
    """

    image_mask: Tensor
    anchor: Tensor
    prompt: Tensor
    marks: Tensor | None = None
    text: Tensor | None = None
    anchor_attn: Tensor | None = None
    layer_keys: Tensor | None = None
    normed_output: Tensor | None = None
    text_attn: Tensor | None = None
    hidden: Tensor | None = None
    embeddings: Tensor | None = None

    def sample(self, i: int) -> PrefillView:
        """The view of sample i alone (row i of every tensor)."""
        rows = {f.name: getattr(self, f.name) for f in fields(self)}
        return PrefillView(**{k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in rows.items()})


@dataclass
class PrefillKeep:
    """A prefill reducer's answer at a stage, when a [B, M] tensor of positions does not say it all.

    index:  [B, M] long, the positions of the stage's sequence that stay, ascending; a sample that
            keeps fewer than M starts with padding slots marked -1 (left padding: the adapter masks
            them out of every attention, now and in the decode steps, and `stats()["kept"]` shows -1)
    hidden: [B, M, D] the hidden states of the kept positions from the stage's layer on (a merged
            token stands at a position of the prompt's numbering); None: those of `index`, unchanged
    marks:  [B, N] bool over the stage's sequence (before the cut): positions the reducer wants to
            find again at its later stages (`PrefillView.marks`); None: keep the earlier marks
    """

    index: Tensor
    hidden: Tensor | None = None
    marks: Tensor | None = None


@dataclass
class BoundaryView:
    """What a boundary reducer sees of a batch of I images at the feature layer (N tower tokens:
    `prefix` CLS tokens, then the patches in the tower's row-major order).

    hidden: [I, N, Dv] the feature layer's output, every token (the CLS first), before the projector
    keeps_prefix: whether the unreduced model's features keep the CLS ("full") or drop it ("default")
    the signals the reducer asked for (None otherwise): see CLS_ATTENTION, FEATURE_KEYS,
    NEXT_CLS_ATTENTION, NEXT_KEYS.
    """

    hidden: Tensor
    prefix: int
    keeps_prefix: bool
    cls_attention: Tensor | None = None
    feature_keys: Tensor | None = None
    next_cls_attention: Tensor | None = None
    next_keys: Tensor | None = None


@dataclass
class BoundaryTokens:
    """A boundary reducer's answer: tokens [I, n, Dv] in the tower's width (the projector follows),
    image i's `counts[i]` first (then padding rows, which are cut off after the projector).

    positions: [I, n] long, the tower token each token stands at (an index into BoundaryView.hidden's
               N tokens: the CLS tokens first, then the patches), -1 for a token merged from several
               (VisionZip's contextual tokens, PruMerge's token of the rest) and for padding rows;
               None: not stated. A tiled image (LLaVA-NeXT) puts each tile's patch tokens back at
               their places in the image's grid by it.
    """

    tokens: Tensor
    counts: Tensor
    positions: Tensor | None = None


def is_boundary_reducer(reducer) -> bool:
    """Whether `reducer` shrinks image features at the vision-language boundary (it has `boundary_needs`)."""
    return callable(getattr(reducer, "boundary_needs", None))


def is_prefill_reducer(reducer) -> bool:
    """Whether `reducer` drops visual tokens inside a language model (it has `prefill_stages`)."""
    return callable(getattr(reducer, "prefill_stages", None))


INSIDE = "drops visual tokens inside the language model of a vision-language model"
BOUNDARY = "shrinks the image features between the vision tower and the language model of a vision-language model"


def require_language_model(who: str, info: ModelInfo, what: str = INSIDE) -> LanguageModelInfo:
    """`info` as a LanguageModelInfo; a ConfigError naming `who` (which `what`) for any other model."""
    if not isinstance(info, LanguageModelInfo):
        raise ConfigError(
            f"{who}: {what} "
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
