"""Reducers that cut the visual tokens of a vision-language model (docs/vlm.md): FastV, PyramidDrop,
DART, SparseVLM drop them inside the language model during the prefill; VisionZip, PruMerge and PruMerge+
shrink each image's features between the vision tower and the language model. The selection rules
are those of `tokenreduce.core.visual_tokens`; these classes only state where they act
(`prefill_stages`, `boundary_needs`), what they read and how many image tokens they keep. An
adapter of a vision-language model places them (`tokenreduce.adapters.hf_vlm`); every other family
refuses them (`check_model`)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.schedule import Schedule, no_cap
from tokenreduce.core.visual_tokens import (
    VISIONZIP_MERGES,
    attention_relevance,
    dart_keep,
    dart_keep_count,
    fastv_keep,
    fastv_keep_count,
    prumerge,
    pyramid_schedule,
    select_raters,
    sparsevlm_keep,
    sparsevlm_recycle_counts,
    text_relevance,
    visionzip,
)
from tokenreduce.core.vlm import (
    ANCHOR_ATTN,
    BOUNDARY,
    CLS_ATTENTION,
    EMBEDDINGS,
    FEATURE_KEYS,
    HIDDEN,
    LAYER_KEYS,
    NEXT_CLS_ATTENTION,
    NEXT_KEYS,
    NORMED_OUTPUT,
    TEXT_ATTN,
    BoundaryTokens,
    BoundaryView,
    LanguageModelInfo,
    PrefillKeep,
    PrefillStage,
    PrefillView,
    check_layers,
    require_language_model,
)
from tokenreduce.errors import ConfigError, check_number, check_numbers, is_list
from tokenreduce.reducers.base import ModelInfo, Strength, TokenReducer, register_reducer


class PrefillReducer(TokenReducer):
    """A reducer that drops image tokens at chosen decoder layers of a language model's prefill.

    Subclasses set `prefill_stages()`, `visual_counts(V)` (image tokens kept from each stage on,
    given V before the first; at most that many where the count adapts to the input) and
    `select(stage, view, count)` (positions of the stage's sequence that stay, ascending, or a
    `PrefillKeep`)."""

    strength = ()
    cap = staticmethod(no_cap)

    def __init__(self):
        super().__init__(Schedule(r=0, owner=self.name), prop_attn=False)

    def acts_at(self, layer: int, removal: int) -> bool:
        return False  # never a block loop's reducer; the language-model adapter runs the stages

    def check_model(self, info: ModelInfo) -> None:
        info = require_language_model(self.name, info)
        name = "layers" if hasattr(self, "layers") else "layer"
        check_layers(self.name, name, getattr(self, name), [s.layer for s in self.prefill_stages()], info)

    def prefill_stages(self) -> list[PrefillStage]:
        raise NotImplementedError

    def visual_counts(self, num_visual: int) -> list[int]:
        raise NotImplementedError

    def check_visual(self, num_visual: int) -> None:
        """A ConfigError when the reducer's setting does not fit `num_visual` image tokens per sample
        (called before the pass computes anything)."""

    def check_prompt(self, image_mask: Tensor, prompt: Tensor) -> None:
        """A ConfigError when a prompt does not suit the reducer (image_mask, prompt: [B, N] bool, the image
        tokens and the prompt's real tokens; called before the pass computes anything)."""

    def select(self, stage: int, view: PrefillView, count: int) -> Tensor | PrefillKeep:
        raise NotImplementedError


@register_reducer("fastv")
class FastV(PrefillReducer):
    """FastV (Chen et al., arXiv 2403.06764, Sec. 4): after decoder layer K-1, rank the image tokens
    by the attention the last prompt token pays them in that layer, averaged over heads, keep the
    `round(V * keep)` highest and drop the rest from layer K on; positions are not renumbered.

    layer: K >= 1, the first layer without the dropped tokens (the paper's K=2)
    keep:  the share of image tokens kept, in [0, 1] (the paper's R=50% is keep=0.5; 1 drops nothing)
    """

    strength = (Strength("keep", 0.0, 1.0, integer=False, larger_removes=False),)

    def __init__(self, layer: int = 2, keep: float = 0.5):
        check_number(self.name, "layer", layer, low=1, integer=True)
        check_number(self.name, "keep", keep, low=0, high=1)
        super().__init__()
        self.layer, self.keep = layer, keep

    def prefill_stages(self) -> list[PrefillStage]:
        return [PrefillStage(layer=self.layer, signal_layer=self.layer - 1, needs=frozenset({ANCHOR_ATTN}))]

    def visual_counts(self, num_visual: int) -> list[int]:
        return [fastv_keep_count(num_visual, 1 - self.keep)]

    def select(self, stage: int, view: PrefillView, count: int) -> Tensor:
        # score_j = mean_h A^{K-1}[h, anchor, j]; top-`count` image tokens; every other token kept
        return fastv_keep(view.anchor_attn, view.image_mask, count, query=0)


@register_reducer("pyramiddrop")
class PyramidDrop(PrefillReducer):
    """PyramidDrop (Xing et al., arXiv 2410.17247, Sec. 3.2): at each stage layer l, rank the image
    tokens still there by the attention the last prompt token pays them, computed with layer l's
    own query and key projections on its input, averaged over heads, and keep
    `pyramid_schedule(V, layers, ratio)[s]` of them from layer l on.

    layers: strictly increasing stage layers, each >= 1 (the paper's [8, 16, 24] on 32 layers)
    ratio:  lambda in (0, 1] (stage s keeps floor(V * lambda**s)), or a list of cumulative ratios,
            one per layer, non-increasing
    renumber: False: positions keep the full prompt's numbering (as FastV and DART); True: after
              each drop every kept token's position drops by the tokens dropped before it, so the
              remaining tokens are numbered without gaps (the reference code's choice), and the
              decode steps follow on from them (not on Qwen's 3-D positions)
    """

    strength = (Strength("ratio", 0.0, 1.0, integer=False, larger_removes=False),)  # one lambda for every stage

    def __init__(self, layers: list[int] = (8, 16, 24), ratio: float | list[float] = 0.5, renumber: bool = False):
        who = self.name
        if not isinstance(renumber, bool):
            raise ConfigError(f"{who}: renumber={renumber!r} is invalid; allowed: True or False")
        layer_list = check_numbers(who, "layers", layers, low=1, integer=True)
        if not layer_list or any(b <= a for a, b in zip(layer_list, layer_list[1:], strict=False)):
            raise ConfigError(f"{who}: layers={layers!r} is invalid; allowed: a non-empty, strictly increasing list "
                              "of layer indices >= 1")
        pyramid_schedule(0, layer_list, list(ratio) if is_list(ratio) else ratio)  # checks ratio against layers
        super().__init__()
        self.layers = list(layer_list)
        self.ratio = list(ratio) if is_list(ratio) else ratio
        self.renumber = renumber

    def prefill_stages(self) -> list[PrefillStage]:
        return [PrefillStage(layer=layer, signal_layer=layer, needs=frozenset({ANCHOR_ATTN}), renumber=self.renumber)
                for layer in self.layers]

    def visual_counts(self, num_visual: int) -> list[int]:
        return pyramid_schedule(num_visual, self.layers, self.ratio)

    def select(self, stage: int, view: PrefillView, count: int) -> Tensor:
        return fastv_keep(view.anchor_attn, view.image_mask, count, query=0)


@register_reducer("dart")
class DART(PrefillReducer):
    """DART (Wen et al., arXiv 2502.11494, Sec. 3): at layer K, pivots (the image and text tokens
    with the largest L1 key norm in layer K-1, after the rotary embedding) each take the image
    tokens least cosine-similar to them (layer K-1's output after the model's final norm);
    `dart_keep_count(budget, image_pivots, text_pivots)` image tokens stay from layer K on.
    No attention map is needed.

    layer:        K >= 1
    budget:       the number split into per-pivot quotas (the reference's 128 keeps 132 with 4 + 4 pivots)
    image_pivots: pivots among the image tokens (kept themselves)
    text_pivots:  pivots among the text tokens after the image
    """

    strength = (Strength("budget", 0, None, integer=True, larger_removes=False),)

    def __init__(self, layer: int = 2, budget: int = 128, image_pivots: int = 4, text_pivots: int = 4):
        check_number(self.name, "layer", layer, low=1, integer=True)
        check_number(self.name, "budget", budget, low=0, integer=True)
        check_number(self.name, "image_pivots", image_pivots, low=0, integer=True)
        check_number(self.name, "text_pivots", text_pivots, low=0, integer=True)
        if image_pivots + text_pivots == 0:
            raise ConfigError(f"{self.name}: image_pivots=0 with text_pivots=0 is invalid; allowed: at least one pivot")
        super().__init__()
        self.layer, self.budget = layer, budget
        self.image_pivots, self.text_pivots = image_pivots, text_pivots

    def prefill_stages(self) -> list[PrefillStage]:
        return [PrefillStage(layer=self.layer, signal_layer=self.layer - 1,
                             needs=frozenset({LAYER_KEYS, NORMED_OUTPUT}))]

    def visual_counts(self, num_visual: int) -> list[int]:
        return [dart_keep_count(self.budget, self.image_pivots, self.text_pivots)]

    def check_visual(self, num_visual: int) -> None:
        kept = self.visual_counts(num_visual)[0]
        if kept > num_visual or self.image_pivots > num_visual:
            raise ConfigError(
                f"{self.name}: budget={self.budget} with image_pivots={self.image_pivots}, text_pivots="
                f"{self.text_pivots} keeps {kept} image tokens, but each sample has {num_visual}; allowed: a budget "
                f"whose kept count (image_pivots + (image_pivots + text_pivots) * (budget // pivots)) is at most "
                f"{num_visual}")

    def select(self, stage: int, view: PrefillView, count: int) -> Tensor:
        position = torch.arange(view.image_mask.shape[1], device=view.image_mask.device)
        last_image = position.masked_fill(~view.image_mask, -1).amax(dim=1, keepdim=True)
        text = view.prompt & (position > last_image)
        return dart_keep(view.normed_output, view.layer_keys, view.image_mask, self.budget, self.image_pivots,
                         self.text_pivots, text_mask=text)


SPARSEVLM_RATERS = ("embeddings", "attention")


def _per_layer(who: str, name: str, value, layers: list[int], **rule) -> list:
    """`value` as one entry per layer: a list of as many numbers as `layers`, or one number for all."""
    if is_list(value):
        values = check_numbers(who, name, value, **rule)
        if len(values) != len(layers):
            raise ConfigError(f"{who}: {name}={value!r} is invalid; allowed: one number for every layer, or a list of "
                              f"{len(layers)} (one per layer of layers={layers!r})")
        return values
    check_number(who, name, value, **rule)
    return [value] * len(layers)


@register_reducer("sparsevlm")
class SparseVLM(PrefillReducer):
    """SparseVLM (Zhang et al., arXiv 2410.04417, v1, Sec. 3): text tokens relevant to the image (the
    raters) rate the image tokens by their attention at each pruning layer l, averaged over heads
    and raters; the number kept adapts to the rank of the raters-by-image attention matrix
    (`core.visual_tokens.sparsevlm_keep_count`); the best-rated pruned tokens are clustered (DPC-KNN
    on layer l's output) and each cluster stays as one recycled token, the mean of its members, at
    its centre's position (`sparsevlm_keep`). Layer l runs on all tokens (its attention rates them);
    the cut holds from layer l + 1 on. Positions keep the prompt's numbering. The count differs per
    sample: in a batch, the samples that keep fewer get padding slots (masked out).

    layers:   the pruning layers l, strictly increasing, each in [0, depth - 2] (the reference's v1
              code: 2, 6, 15, 19 on LLaVA-1.5's 32 layers; v1.5 prunes at 2, 6, 15)
    scale:    lambda: `floor(scale * rank + bias)` image tokens kept (the reference's settings for
              192 / 128 / 64 tokens on average: 13.5 / 9 / 0.8 with bias 0 / 6 / 0); one for all
              layers or one per layer
    bias:     added to the count (one, or one per layer); `scale=0, bias=k` keeps exactly k
    keep:     None, or the most image tokens kept at each layer (one, or one per layer; the
              reference's v1.5 budgets for 192 / 128 / 64: [300, 200, 110] / [303, 110, 36] /
              [66, 30, 17] at layers 2, 6, 15, with scale=0, bias=those or a large scale)
    recycle:  tau in [0, 1], the share of pruned tokens recycled: the `floor(tau * P) + 1` best rated
              (the reference's 0.3; 0 recycles none)
    clusters: in (0, 1], recycled tokens per cluster: `floor(clusters * m) + 1` clusters of the m
              recycled tokens (the reference's 0.1)
    raters:   "embeddings" (the reference's: chosen once, before the first layer, from the language
              model's input states, `r_t = mean_v softmax_t(h_v . h_t)`) or "attention" (chosen again
              at each pruning layer from the text tokens' mean attention to the image tokens); the
              raters are the text tokens (real prompt tokens after the image) with `r_t >= mean(r)`
    """

    # the cap on the adaptive count: a count asked for is met where the rank rule would keep more
    strength = (Strength("keep", 0, None, integer=True, larger_removes=False),)

    def __init__(self, layers: list[int] = (2, 6, 15, 19), scale: float | list[float] = 13.5,
                 bias: float | list[float] = 0.0, keep: int | list[int] | None = None, recycle: float = 0.3,
                 clusters: float = 0.1, raters: str = "embeddings"):
        who = self.name
        layer_list = check_numbers(who, "layers", layers, low=0, integer=True)
        if not layer_list or any(b <= a for a, b in zip(layer_list, layer_list[1:], strict=False)):
            raise ConfigError(f"{who}: layers={layers!r} is invalid; allowed: a non-empty, strictly increasing list "
                              "of layer indices >= 0")
        scales = _per_layer(who, "scale", scale, layer_list, low=0, finite=True)
        biases = _per_layer(who, "bias", bias, layer_list, finite=True)
        keeps = None if keep is None else _per_layer(who, "keep", keep, layer_list, low=0, integer=True)
        check_number(who, "recycle", recycle, low=0, high=1)
        check_number(who, "clusters", clusters, low=0, high=1, low_open=True)
        if raters not in SPARSEVLM_RATERS:
            raise ConfigError(f"{who}: raters={raters!r} is invalid; allowed: " + ", ".join(map(repr, SPARSEVLM_RATERS)))
        super().__init__()
        self.layers = list(layer_list)
        self.scale = list(scale) if is_list(scale) else scale
        self.bias = list(bias) if is_list(bias) else bias
        self.keep = list(keep) if is_list(keep) else keep
        self.recycle, self.clusters, self.raters = recycle, clusters, raters
        self._scales, self._biases, self._keeps = scales, biases, keeps

    def check_model(self, info: ModelInfo) -> None:
        info = require_language_model(self.name, info)
        if not all(0 <= layer <= info.depth - 2 for layer in self.layers):
            raise ConfigError(f"{self.name}: layers={self.layers!r} is invalid for {info.name}, whose language model "
                              f"has {info.depth} decoder layers; allowed: integers in [0, {info.depth - 2}] (the cut "
                              "holds from the layer after each)")

    def prefill_stages(self) -> list[PrefillStage]:
        stages = []
        for s, layer in enumerate(self.layers):
            needs = {TEXT_ATTN, HIDDEN} | ({EMBEDDINGS} if self.raters == "embeddings" and s == 0 else set())
            stages.append(PrefillStage(layer=layer + 1, signal_layer=layer, needs=frozenset(needs)))
        return stages

    def visual_counts(self, num_visual: int) -> list[int]:
        """The most image tokens each stage keeps (rated and recycled; the count adapts to each input)."""
        counts, v = [], num_visual
        for s in range(len(self.layers)):
            k = v if self._keeps is None else min(v, self._keeps[s])
            v = k + sparsevlm_recycle_counts(v - k, self.recycle, self.clusters)[1] if k < v else v
            counts.append(v)
        return counts

    def check_prompt(self, image_mask: Tensor, prompt: Tensor) -> None:
        position = torch.arange(image_mask.shape[1], device=image_mask.device)
        last_image = position.masked_fill(~image_mask, -1).amax(dim=1, keepdim=True)
        without = ((prompt & (position > last_image)).sum(dim=1) == 0).nonzero()[:, 0].tolist()
        if without:
            raise ConfigError(f"{self.name}: samples {without} have no text token after their image; the text tokens "
                              "after the image rate the image tokens; allowed: prompts with text after the image "
                              "(as LLaVA's 'USER: <image>\\n... ASSISTANT:')")

    def select(self, stage: int, view: PrefillView, count: int) -> PrefillKeep:
        marks = None
        if self.raters == "attention":
            raters = select_raters(attention_relevance(view.text_attn, view.image_mask, view.text), view.text)
        elif stage == 0:  # chosen once, from the language model's input; found again at later stages by the marks
            raters = select_raters(text_relevance(view.embeddings, view.image_mask, view.text), view.text)
            b, n = view.image_mask.shape
            at = view.text.masked_fill(view.text < 0, n)  # padding rows write to a spare column
            marks = view.image_mask.new_zeros(b, n + 1).scatter_(1, at, raters)[:, :n]
        else:
            raters = view.marks.gather(1, view.text.clamp_min(0)) & (view.text >= 0)
        out = sparsevlm_keep(view.text_attn, view.text, raters, view.image_mask, view.hidden,
                             scale=self._scales[stage], bias=self._biases[stage],
                             keep=None if self._keeps is None else self._keeps[stage], recycle=self.recycle,
                             clusters=self.clusters)
        return PrefillKeep(index=out.index, hidden=out.hidden, marks=marks)


# --- at the boundary between the vision tower and the language model ----------------------------------
class BoundaryReducer(TokenReducer):
    """A reducer that shrinks each image's features from V to k tokens before the projector.

    Subclasses set `boundary_needs()` (the signals, core.vlm), `check_vision(info)` (a ConfigError
    when the setting does not fit the model's vision tower, called at apply) and
    `reduce_features(view) -> BoundaryTokens` (with the tower token each token stands at, by which
    the tiles of a LLaVA-NeXT image are laid out; on LLaVA-NeXT every view is one image here)."""

    strength = ()
    cap = staticmethod(no_cap)

    def __init__(self):
        super().__init__(Schedule(r=0, owner=self.name), prop_attn=False)

    def acts_at(self, layer: int, removal: int) -> bool:
        return False  # never a block loop's reducer; the vision-language adapter calls it once per image batch

    def check_model(self, info: ModelInfo) -> None:
        info = require_language_model(self.name, info, BOUNDARY)
        if info.vision_tokens <= info.vision_prefix:
            raise ConfigError(f"{self.name}: model {info.name} has no supported vision tower ({self.name} ranks the "
                              "patches by the CLS token's attention in a transformers CLIPVisionModel read at one "
                              "vision_feature_layer with strategy 'default' or 'full', as LLaVA-1.5 "
                              "(LlavaForConditionalGeneration) and LLaVA-NeXT (LlavaNextForConditionalGeneration) "
                              "have it); allowed: such a model, or the language-model reducers 'fastv', "
                              "'pyramiddrop', 'dart', 'sparsevlm'")
        self.check_vision(info)

    def boundary_needs(self) -> frozenset[str]:
        raise NotImplementedError

    def check_vision(self, info: LanguageModelInfo) -> None:
        """A ConfigError when the setting does not fit `info`'s vision tower."""

    def reduce_features(self, view: BoundaryView) -> BoundaryTokens:
        raise NotImplementedError


@register_reducer("visionzip")
class VisionZip(BoundaryReducer):
    """VisionZip (Yang et al., arXiv 2412.04467, Sec. 4), on the feature layer's output: the dominant
    tokens, top-k by the CLS token's attention summed over heads, then `contextual` tokens merged
    from the rest by key similarity to evenly spaced targets (`core.visual_tokens.visionzip`).

    dominant:   tokens kept by CLS attention; with `keep_cls` the CLS token counts among them and
                comes first (the reference's 54 is CLS + 53 patches), without it only patches
    contextual: merged tokens (0: the rest is dropped); dominant + contextual tokens per image
                reach the language model (54 + 10 = 64)
    keep_cls:   keep the CLS token as the first token (the reference's, on LLaVA-1.5's "default"
                features, which drop it unreduced); False: patches only, so `dominant` = the image's
                patches with `contextual=0` gives the unreduced model's features exactly
    merge:      "mean" (each contextual token is the mean of its target and members, the paper's)
                or "target_plus_mean" (the reference code's)
    """

    # the dominant tokens, `contextual` held fixed (the paper's 64/128/192 split them 54+10, 108+20, 162+30)
    strength = (Strength("dominant", 1, None, integer=True, larger_removes=False),)

    def __init__(self, dominant: int = 54, contextual: int = 10, keep_cls: bool = True, merge: str = "mean"):
        who = self.name
        check_number(who, "dominant", dominant, low=0, integer=True)
        check_number(who, "contextual", contextual, low=0, integer=True)
        if not isinstance(keep_cls, bool):
            raise ConfigError(f"{who}: keep_cls={keep_cls!r} is invalid; allowed: true or false")
        if keep_cls and dominant < 1:
            raise ConfigError(f"{who}: dominant={dominant} with keep_cls=True is invalid; allowed: dominant >= 1 "
                              "(the CLS token counts among the dominant tokens)")
        if merge not in VISIONZIP_MERGES:
            raise ConfigError(f"{who}: merge={merge!r} is invalid; allowed: " + ", ".join(map(repr, VISIONZIP_MERGES)))
        if dominant + contextual == 0:
            raise ConfigError(f"{who}: dominant=0 with contextual=0 is invalid; allowed: at least one token per image")
        super().__init__()
        self.dominant, self.contextual, self.keep_cls, self.merge = dominant, contextual, keep_cls, merge

    def boundary_needs(self) -> frozenset[str]:
        return frozenset({CLS_ATTENTION, FEATURE_KEYS})

    def check_vision(self, info: LanguageModelInfo) -> None:
        patches = info.image_patches
        prefix = info.vision_prefix if self.keep_cls else 0
        if self.dominant - prefix + self.contextual > patches:
            counted = f" (the CLS token and {self.dominant - prefix} patches)" if prefix else ""
            raise ConfigError(
                f"{self.name}: dominant={self.dominant}{counted} + contextual={self.contextual} is more than the "
                f"{patches} image tokens (patches) of {info.name}'s vision tower; allowed: dominant"
                f"{' - 1' if prefix else ''} + contextual <= {patches}")

    def reduce_features(self, view: BoundaryView) -> BoundaryTokens:
        tokens, assignment = visionzip(view.cls_attention, view.feature_keys, view.hidden, self.dominant,
                                       self.contextual, prefix=view.prefix, keep_prefix=self.keep_cls, merge=self.merge)
        i, k = tokens.shape[:2]
        counts = torch.full((i,), k, dtype=torch.long, device=tokens.device)
        # the kept tokens (CLS, dominant: the first k - contextual slots) stand at their tower token, one each;
        # the contextual ones at none. Every other token writes to a spare column, cut off.
        fixed = k - self.contextual
        dest = assignment.dest.masked_fill(assignment.dest >= fixed, k)
        source = torch.arange(dest.shape[1], device=dest.device).expand_as(dest)
        positions = dest.new_full((i, k + 1), -1).scatter_(1, dest, source)[:, :k]
        return BoundaryTokens(tokens=tokens, counts=counts, positions=positions)


@register_reducer("prumerge")
class PruMerge(BoundaryReducer):
    """LLaVA-PruMerge (Shang et al., arXiv 2403.15388, Sec. 3, Algorithm 1): per image, keep the
    patches whose CLS attention is an IQR outlier (an adaptive count), each updated with its
    `neighbours` nearest patches by key similarity weighted by their attention, plus one token of
    the rest weighted by attention (`core.visual_tokens.prumerge` with the reference's settings).
    The signals are the reference's: the CLS row of one-head attention from the query and key
    projections of the layer after the feature layer, taken whole, and that key projection; the
    merged features are the feature layer's patch outputs. The count differs per image.

    neighbours: patches pulled into each kept one (the reference's 32)
    """

    plus = False

    def __init__(self, neighbours: int = 32):
        check_number(self.name, "neighbours", neighbours, low=0, integer=True)
        super().__init__()
        self.neighbours = neighbours

    def boundary_needs(self) -> frozenset[str]:
        return frozenset({NEXT_CLS_ATTENTION, NEXT_KEYS})

    def check_vision(self, info: LanguageModelInfo) -> None:
        if info.feature_layer + 1 >= info.vision_depth:
            raise ConfigError(
                f"{self.name}: {info.name} reads its image features from the vision tower's last layer "
                f"({info.feature_layer}); {self.name} ranks patches by the attention of the layer after the feature "
                "layer; allowed: a model whose vision_feature_layer is not the last (LLaVA-1.5's -2)")
        if self.neighbours > info.image_patches - 1:
            raise ConfigError(f"{self.name}: neighbours={self.neighbours} is more than the {info.image_patches - 1} "
                              f"other patches of an image of {info.name}; allowed: neighbours <= "
                              f"{info.image_patches - 1}")

    def reduce_features(self, view: BoundaryView) -> BoundaryTokens:
        out = prumerge(view.next_cls_attention, view.next_keys, view.hidden, plus=self.plus, prefix=view.prefix,
                       neighbours=self.neighbours)
        return BoundaryTokens(tokens=out.tokens, counts=out.valid.sum(dim=1), positions=out.index)


@register_reducer("prumerge+")
class PruMergePlus(PruMerge):
    """LLaVA-PruMerge+ (arXiv 2403.15388, Sec. 3.3): PruMerge's outliers plus spatially uniform
    samples (every s-th patch, s = (N // n_keep) // 3, those not already kept), then the same merge.

    neighbours: patches pulled into each kept one (the reference's 32)
    """

    plus = True
