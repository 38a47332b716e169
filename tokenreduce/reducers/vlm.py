"""Reducers that drop visual tokens inside a vision-language model's language model during the
prefill: FastV, PyramidDrop, DART (docs/vlm.md). The selection rules are those of
`tokenreduce.core.visual_tokens`; these classes only state where they act (`prefill_stages`) and
how many image tokens each stage keeps. An adapter of a vision-language model places them
(`tokenreduce.adapters.hf_vlm`); every other family refuses them (`check_model`)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.schedule import Schedule, no_cap
from tokenreduce.core.visual_tokens import (
    dart_keep,
    dart_keep_count,
    fastv_keep,
    fastv_keep_count,
    pyramid_schedule,
)
from tokenreduce.core.vlm import (
    ANCHOR_ATTN,
    LAYER_KEYS,
    NORMED_OUTPUT,
    PrefillStage,
    PrefillView,
    check_layers,
    require_language_model,
)
from tokenreduce.errors import ConfigError, check_number, check_numbers, is_list
from tokenreduce.reducers.base import ModelInfo, TokenReducer, register_reducer


class PrefillReducer(TokenReducer):
    """A reducer that drops image tokens at chosen decoder layers of a language model's prefill.

    Subclasses set `prefill_stages()`, `visual_counts(V)` (image tokens kept from each stage on,
    given V before the first) and `select(stage, view, count)` (positions of the stage's sequence
    that stay, ascending)."""

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

    def select(self, stage: int, view: PrefillView, count: int) -> Tensor:
        raise NotImplementedError


@register_reducer("fastv")
class FastV(PrefillReducer):
    """FastV (Chen et al., arXiv 2403.06764, Sec. 4): after decoder layer K-1, rank the image tokens
    by the attention the last prompt token pays them in that layer, averaged over heads, keep the
    `round(V * keep)` highest and drop the rest from layer K on; positions are not renumbered.

    layer: K >= 1, the first layer without the dropped tokens (the paper's K=2)
    keep:  the share of image tokens kept, in [0, 1] (the paper's R=50% is keep=0.5; 1 drops nothing)
    """

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
    Positions keep the full prompt's numbering (as FastV and DART); the reference renumbers them
    after each drop, which this placement does not do (docs/vlm.md).
    """

    def __init__(self, layers: list[int] = (8, 16, 24), ratio: float | list[float] = 0.5):
        who = self.name
        layer_list = check_numbers(who, "layers", layers, low=1, integer=True)
        if not layer_list or any(b <= a for a, b in zip(layer_list, layer_list[1:], strict=False)):
            raise ConfigError(f"{who}: layers={layers!r} is invalid; allowed: a non-empty, strictly increasing list "
                              "of layer indices >= 1")
        pyramid_schedule(0, layer_list, list(ratio) if is_list(ratio) else ratio)  # checks ratio against layers
        super().__init__()
        self.layers = list(layer_list)
        self.ratio = list(ratio) if is_list(ratio) else ratio

    def prefill_stages(self) -> list[PrefillStage]:
        return [PrefillStage(layer=layer, signal_layer=layer, needs=frozenset({ANCHOR_ATTN})) for layer in self.layers]

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
