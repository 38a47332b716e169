"""Cutting the visual tokens of a Hugging Face `transformers` vision-language model,
`LlavaForConditionalGeneration` (the LLaVA-1.5 layout: a CLIP tower, a projector, a Llama language
model), in one of three placements (`tokenreduce.reducers.vlm`; docs/vlm.md; the other classes, and
which placements they take: hf_vlm_families):

(a) inside the vision tower (any other reducer: pitome, tome, tofu, ...): the CLIP adapter (hf_clip)
patches the tower, which returns the merged tokens at the `vision_feature_layer` LLaVA selects (as
plain features, CLS first); `get_image_features` is wrapped only to record each image's count, and
the rest is placement (b)'s bookkeeping (placeholder runs cut, re-left-padding, decode);

(b) at the boundary between the vision tower and the language model (VisionZip, PruMerge,
PruMerge+: boundary reducers, `core.vlm.is_boundary_reducer`): hooks on the tower's feature layer
keep its input and output, a pre-hook on the projector hands it the reducer's k tokens per image
in place of the V features, the inner model's `get_image_features` (wrapped, signature kept) cuts
each image's projected tokens to its count, and the model's `forward` cuts each image's placeholder
run to that count, re-left-pads the batch and carries the mask and position ids; decode steps get
the shortened prefill's mask and shifted positions (`BoundaryDecode`, stored per cache). On
LLaVA-NeXT (`LlavaNextForConditionalGeneration`) `get_image_features` is the adapter's own
(`tiled_image_features`): every view of an image (its base view and its tiles) is reduced on its own,
and the image's tokens are laid out by `tiled_layout` (no unpadding, no newline tokens);

(c) inside the language model during the prefill (FastV, PyramidDrop, DART, SparseVLM: prefill
reducers), described below. One reducer per model: the kinds are not combined.

The model runs its own forward and its own layers. Placement (c) is forward pre-hooks on the
language model's decoder layers, and a wrapper of the model's `forward` and `generate`:
- the wrapper finds the image tokens (the placeholder id) and each sample's anchor (its last prompt
  token; under `generate` the last token of the prompt it was given, so a pass without the KV cache,
  which runs the prompt again with every new token, selects as the cached prefill did), and opens a
  per-pass object that the hooks read;
- at a stage layer the hook computes the reducer's signals (the anchor's attention row recomputed
  from the layer's q/k projections, rotary embedding and mask row, as eager attention would give it:
  sdpa returns no weights; or the text tokens' attention rows, computed alike; or the layer's keys;
  or the previous layer's output, as it is or through the final norm; or the language model's
  input), asks the reducer which positions stay and gathers the hidden states, the rotary (cos,
  sin), the position ids and the 4-D mask's rows and columns; every later layer gets the shortened
  ones. Kept positions are tracked in the prompt's numbering, so stages compose and positions are
  not renumbered (FastV). A reducer may replace the kept states (SparseVLM's recycled tokens) and
  keep a different number per sample: the shorter samples get padding slots on the left, masked
  out of every attention (their own row attends only to itself);
- the KV cache of layers from the first stage on holds fewer entries than layer 0's. Decode steps
  keep the full numbering of positions (generate builds them from the 2-D mask) and get a mask of
  the full length plus the new tokens; the hook gathers, at each reduced layer, the mask's columns
  of the kept prompt positions and of the new tokens, so padding stays masked. What the prefill
  kept is stored per cache object (weakly), so any cache a reduced prefill filled can be continued;
  the padding slots stay masked in every decode step (a mask is built where sdpa had none).

Refused before any compute, with the reason: beams and num_return_sequences > 1, chunked prefill,
static/offloaded/quantized caches and caches with sliding-window layers, a non-empty cache not
filled by a reduced prefill, assisted decoding, attention other than eager/sdpa, labels (the logits
are those of the kept positions), per-layer outputs and inputs_embeds without input_ids. A video's
placeholders (Qwen2-VL/2.5-VL, OneVision) are visual tokens as an image's are.
Samples holding different numbers of image tokens are selected one by one (`select_each`), each with
its own counts, and the shorter ones padded on the left.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import ModelInfo, adapters, facts_of, is_patched, register_adapter
from tokenreduce.adapters.hf_common import (
    HFAdapterBase,
    bind,
    check_attention_implementation,
    import_transformers,
    modeling,
    refuse_outputs,
)
from tokenreduce.adapters.hf_vlm_families import (
    BOUNDARY_FAMILIES,
    ENCODERS,
    FAMILIES,
    LLAVA,
    LLAVA_NEXT,
    NO_BOUNDARY,
    QWEN,
    VisionInputs,
    check_language_model,
    counted_vision_macs,
    family_of,
    recording_features,
    visual_token_ids,
)
from tokenreduce.adapters.hf_vlm_families import probe_inputs as family_probe_inputs
from tokenreduce.core.contract import Patch
from tokenreduce.core.macs import linear_macs
from tokenreduce.core.state import LayerRecord, ReductionState
from tokenreduce.core.vlm import (
    ANCHOR_ATTN,
    CLS_ATTENTION,
    EMBEDDINGS,
    FEATURE_KEYS,
    HIDDEN,
    LAYER_KEYS,
    NEXT_CLS_ATTENTION,
    NEXT_KEYS,
    NORMED_OUTPUT,
    TEXT_ATTN,
    BoundaryView,
    LanguageModelInfo,
    PrefillKeep,
    PrefillView,
    is_boundary_reducer,
    is_prefill_reducer,
)
from tokenreduce.errors import ConfigError, UnsupportedModelError

SUPPORTED = tuple(FAMILIES)
REDUCERS = ("fastv", "pyramiddrop", "dart", "sparsevlm", "none")  # inside the language model (placement (c))
BOUNDARY_REDUCERS = ("visionzip", "prumerge", "prumerge+")  # at the vision-language boundary (placement (b))


def _claimed_class(cls: type) -> type | None:
    family = family_of(cls)
    return None if family is None else getattr(modeling(FAMILIES[family]), family)


def language_model(model: nn.Module) -> nn.Module:
    return model.model.language_model


def describe(model: nn.Module) -> LanguageModelInfo:
    name = type(model).__name__
    lm = language_model(model)
    check_language_model(name, lm)
    check_attention_implementation(name, lm.config, why="the kept tokens' 4-D mask is gathered, which these take")
    config = lm.config
    head_dim = lm.layers[0].self_attn.head_dim
    return LanguageModelInfo(name=name, depth=len(lm.layers), num_prefix=0, has_class_token=False,
                             embed_dim=config.hidden_size, num_heads=config.num_attention_heads,
                             image_token_id=int(model.config.image_token_id), num_kv_heads=config.num_key_value_heads,
                             head_dim=head_dim,
                             **(vision_facts(model) if family_of(type(model)) in BOUNDARY_FAMILIES else {}))


def vision_layers(model: nn.Module) -> nn.ModuleList | None:
    """The encoder layers of a CLIPVisionModel tower made of transformers' own CLIP layers; None otherwise."""
    clip = modeling("clip")
    tower = model.model.vision_tower
    if type(tower) is not clip.CLIPVisionModel:
        return None
    layers = tower.encoder.layers
    if any(type(layer) is not clip.CLIPEncoderLayer or type(layer.self_attn) is not clip.CLIPAttention
           for layer in layers):
        return None
    return layers


def vision_facts(model: nn.Module) -> dict:
    """The vision tower's facts for boundary reducers (LanguageModelInfo); {} when it is not a supported one
    (a CLIPVisionModel read at one vision_feature_layer with strategy "default" or "full")."""
    layers = vision_layers(model)
    config = model.config
    feature = config.vision_feature_layer
    if layers is None or not isinstance(feature, int) or config.vision_feature_select_strategy not in ("default", "full"):
        return {}
    depth = len(layers)
    position = feature % (depth + 1) if -(depth + 1) <= feature <= depth else 0
    if position == 0:  # the embeddings: no layer computed them
        return {}
    vision = config.vision_config
    return {"vision_tokens": (vision.image_size // vision.patch_size) ** 2 + 1, "vision_prefix": 1,
            "vision_depth": depth, "feature_layer": position - 1,
            "feature_prefix": config.vision_feature_select_strategy == "full"}


# --- the per-pass objects ---------------------------------------------------------------------------
@dataclass
class Prefill:
    """One prefill pass in flight: the sequence as it is at the current layer, in the prompt's
    numbering (`kept`), and what the pass did, layer by layer."""

    reducer: object
    stages: list
    counts: list[int]  # per stage: the image tokens kept, for num_visual before the first
    image_mask: Tensor  # [B, N] of the current sequence
    anchor: Tensor  # [B] current position of each sample's anchor
    prompt: Tensor  # [B, N] the prompt's real tokens (not padding, not generated)
    valid: Tensor  # [B, N] the real tokens (not padding), generated ones included
    valid_total: Tensor  # [B] the real tokens of the pass
    kept: Tensor  # [B, N] the current positions' indices in the full sequence
    num_visual: int  # image tokens per sample (the most of any sample)
    sample_counts: list | None = None  # per sample its counts per stage (None: no image), where samples differ
    stage_inputs: dict = field(default_factory=dict)  # stage index -> (hidden, kwargs) at its signal layer
    replaced: dict | None = None  # the shortened layer arguments, once a stage dropped tokens
    entering: list[int] = field(default_factory=list)  # per layer: sequence tokens before its drop (per sample)
    tokens: list[int] = field(default_factory=list)  # per layer: sequence tokens through it (per sample)
    visual_rows: list = field(default_factory=list)  # per layer: each sample's image tokens through it
    kept_at: list = field(default_factory=list)  # per layer: kept full-sequence indices (-1: a padding slot), None: all
    padded: list[bool] = field(default_factory=list)  # per layer: whether kept_at holds padding slots
    shifts: list = field(default_factory=list)  # per layer: [B] real tokens dropped before it, once renumbered
    renumbered: bool = False  # whether a stage renumbered the positions
    has_pads: bool = False  # whether the sequence holds padding slots (a reducer kept per-sample counts)
    marks: Tensor | None = None  # [B, N] what the reducer marked for its later stages (PrefillKeep.marks)
    embeddings: Tensor | None = None  # decoder layer 0's input, when a stage reads EMBEDDINGS
    reducer_macs: int = 0


@dataclass
class Decode:
    """One pass that continues a reduced prefill's cache: per layer the prefill's kept indices (-1: a
    padding slot, masked out) and whether there are any."""

    kept_at: list
    padded: list | None = None
    shifts: list | None = None  # per layer: [B] positions to take off the new tokens' (renumbered), or None


@dataclass
class VLMPatch(Patch):
    """The Patch of a vision-language model: the hooks (on its decoder layers, or on the vision
    tower's feature layer and the projector), the pass in flight and the prompt length of the
    `generate` call in flight (per thread), and per cache filled by a reduced prefill what the
    decode steps need (`Decode` or `BoundaryDecode`)."""

    handles: list = field(default_factory=list, repr=False)
    local: threading.local = field(default_factory=threading.local, repr=False)
    boundary: bool = False  # a boundary reducer (placement (b)) rather than one inside the language model
    in_tower: bool = False  # a vision reducer placed in the CLIP tower by hf_clip (placement (a)); boundary too
    reducer: object = field(default=None, repr=False)  # the boundary reducer
    model_ref: object = field(default=None, repr=False)  # weakref to the model (boundary)
    caches: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    family: str = LLAVA  # the model class (hf_vlm_families.FAMILIES)
    vision_costs: dict = field(default_factory=dict, repr=False)  # VisionInputs.key() -> counted_vision_macs

    def __reduce_ex__(self, protocol):
        raise ConfigError("a token-reduced vision-language model cannot be copied or pickled; allowed: copy or save it "
                          "before tokenreduce.apply, or after tokenreduce.remove (the state dict is unchanged)")


# --- the signals -------------------------------------------------------------------------------------
def _per_sample(t: Tensor, batch: int) -> Tensor:
    return t.expand(batch, *t.shape[1:])


def _gather_tokens(t: Tensor, index: Tensor) -> Tensor:
    """Rows `index` [B, M] of t [B or 1, N, ...] along dim 1."""
    t = _per_sample(t, index.shape[0])
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:]))


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' Llama rotary embedding of x [B, H, N, d] at (cos, sin) [B, N, d]."""
    return modeling("llama").apply_rotary_pos_emb(x, x, cos, sin)[0]


def layer_keys(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The keys [B, H_kv, N, d] the layer computes from its input, after the rotary embedding."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, n, _ = x.shape
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
    return _rotary(k, _per_sample(cos, b), _per_sample(sin, b))


def query_attention(layer: nn.Module, hidden: Tensor, mask: Tensor | None, cos: Tensor, sin: Tensor,
                    rows: Tensor) -> Tensor:
    """The attention probabilities [B, H, Q, N] of the query positions `rows` [B, Q] in `layer`, as
    eager attention computes them: softmax(q_r k^T * scaling + mask rows) in float32, q_r and k after
    the rotary embedding, the keys repeated over each key-value head's query heads."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, n, _ = x.shape
    r = rows.shape[1]
    cos, sin = _per_sample(cos, b), _per_sample(sin, b)
    xa = _gather_tokens(x, rows)
    q = attn.q_proj(xa).view(b, r, -1, attn.head_dim).transpose(1, 2)
    q = _rotary(q, _gather_tokens(cos, rows), _gather_tokens(sin, rows))
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
    k = modeling("llama").repeat_kv(_rotary(k, cos, sin), attn.num_key_value_groups)
    logits = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # [B, H, Q, N]
    if mask is None:  # sdpa without padding: causal
        row = torch.arange(n, device=x.device).view(1, 1, 1, n) <= rows.view(b, 1, r, 1)
    else:
        mask = _per_sample(mask, b)
        row = mask.gather(2, rows.view(b, 1, r, 1).expand(b, mask.shape[1], r, mask.shape[-1]))
    if row.dtype == torch.bool:
        logits = logits.masked_fill(~row, torch.finfo(logits.dtype).min)
    else:
        logits = logits + row
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def anchor_attention(layer: nn.Module, hidden: Tensor, mask: Tensor | None, cos: Tensor, sin: Tensor,
                     anchor: Tensor) -> Tensor:
    """The anchor token's attention probabilities [B, H, 1, N] in `layer` (`query_attention` of one row)."""
    return query_attention(layer, hidden, mask, cos, sin, anchor.view(-1, 1))


def text_rows(image_mask: Tensor, prompt: Tensor) -> Tensor:
    """Each sample's text tokens [B, T]: the real prompt tokens after its last image token, ascending,
    then -1 (T: the most of any sample)."""
    b, n = image_mask.shape
    position = torch.arange(n, device=image_mask.device)
    last_image = position.masked_fill(~image_mask, -1).amax(dim=1, keepdim=True) if n else position.view(1, 0)
    text = prompt & (position > last_image)
    width = int(text.sum(dim=1).max()) if b else 0
    rows = torch.where(text, position, n).sort(dim=1).values[:, :width]
    return rows.masked_fill(rows == n, -1)


def _mask_padding_slots(mask: Tensor | None, pad: Tensor, queries: int, prefill: bool) -> Tensor:
    """The 4-D mask [B, h, Q, K] (Q = `queries`, the last Q of the K keys) with the key columns of the
    padding slots `pad` [B, K] masked out for every query. In a prefill (Q = K) a padding slot's own
    row attends only to itself, so its state stays finite. A None mask (sdpa without padding) is
    first made the causal boolean mask it stands for."""
    b, k = pad.shape
    if mask is None:
        causal = torch.ones(queries, k, dtype=torch.bool, device=pad.device).tril(diagonal=k - queries)
        mask = causal.expand(b, 1, queries, k)
    mask = _per_sample(mask, b)
    blocked = pad.view(b, 1, 1, k)
    own = None
    if prefill:
        eye = torch.eye(k, dtype=torch.bool, device=pad.device).view(1, 1, k, k)
        own = eye & pad.view(b, 1, k, 1)  # a padding slot's own entry
        blocked = (blocked | pad.view(b, 1, k, 1)) & ~eye
    if mask.dtype == torch.bool:
        mask = mask & ~blocked
        return mask | own if own is not None else mask
    mask = mask.masked_fill(blocked, torch.finfo(mask.dtype).min)
    return mask.masked_fill(own, 0.0) if own is not None else mask


def _gather_mask(mask: Tensor | None, index: Tensor) -> Tensor | None:
    """The 4-D mask's rows and columns at `index` [B, M]."""
    if mask is None:
        return None
    b, m = index.shape
    mask = _per_sample(mask, b)
    heads, n = mask.shape[1], mask.shape[-1]
    rows = mask.gather(2, index.view(b, 1, m, 1).expand(b, heads, m, n))
    return rows.gather(3, index.view(b, 1, 1, m).expand(b, heads, m, m))


# --- the hooks ---------------------------------------------------------------------------------------
class LayerHook:
    """The forward pre-hook of decoder layer `index` (see the module's docstring)."""

    def __init__(self, patch: VLMPatch, lm: nn.Module, index: int):
        self.patch, self.lm, self.index = patch, lm, index

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict):
        run = getattr(self.patch.local, "run", None)
        if run is None:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if isinstance(run, Decode):
            kwargs = self.decode(run, hidden, kwargs)
        else:
            hidden, kwargs = self.prefill(run, layer, hidden, kwargs)
        return (hidden, *args[1:]), kwargs

    def decode(self, run: Decode, hidden: Tensor, kwargs: dict) -> dict:
        shift = run.shifts[self.index] if run.shifts is not None else None
        if shift is not None:  # the prefill renumbered this layer's tokens: the new ones follow them
            positions = kwargs["position_ids"] - shift.view(-1, 1)
            kwargs["position_ids"] = positions
            kwargs["position_embeddings"] = self.lm.rotary_emb(hidden, positions)
        kept = run.kept_at[self.index]
        mask = kwargs.get("attention_mask")
        padded = run.padded is not None and run.padded[self.index]
        if kept is None or (mask is None and not padded):
            return kwargs
        b, q = hidden.shape[:2]
        cached = kwargs["cache"].get_seq_length(self.index)
        new = cached + q - kept.shape[1]  # the decode tokens this layer's cache holds after this step
        if mask is not None:
            full = mask.shape[-1]
            columns = torch.cat([kept.clamp_min(0), torch.arange(full - new, full, device=kept.device).expand(b, new)],
                                dim=1)
            mask = _per_sample(mask, b)
            mask = mask.gather(3, columns.view(b, 1, 1, -1).expand(b, mask.shape[1], mask.shape[2], -1))
        if padded:  # the prefill's padding slots stay out of every step's attention
            pad = torch.cat([kept < 0, torch.zeros(b, new, dtype=torch.bool, device=kept.device)], dim=1)
            mask = _mask_padding_slots(mask, pad, q, prefill=False)
        kwargs["attention_mask"] = mask
        return kwargs

    def prefill(self, run: Prefill, layer: nn.Module, hidden: Tensor, kwargs: dict) -> tuple[Tensor, dict]:
        if run.replaced is not None:
            kwargs.update(run.replaced)
        if self.index == 0 and any(EMBEDDINGS in stage.needs for stage in run.stages):
            run.embeddings = hidden
        run.entering.append(hidden.shape[1])
        for s, stage in enumerate(run.stages):
            if stage.layer == self.index:
                hidden, kwargs = self.drop(run, s, stage, hidden, kwargs)
        for s, stage in enumerate(run.stages):  # what this layer gets, after a drop at its input
            if stage.signal_layer == self.index and stage.layer > self.index:
                run.stage_inputs[s] = (hidden, dict(kwargs))
        run.tokens.append(hidden.shape[1])
        run.visual_rows.append(run.image_mask.sum(dim=1).tolist())
        run.kept_at.append(None if run.replaced is None else run.kept)
        run.padded.append(run.replaced is not None and run.has_pads)
        run.shifts.append(run.valid_total - run.valid.sum(dim=1) if run.renumbered else None)
        return hidden, kwargs

    def drop(self, run: Prefill, s: int, stage, hidden: Tensor, kwargs: dict) -> tuple[Tensor, dict]:
        source_hidden, source_kwargs = run.stage_inputs.pop(s, (hidden, kwargs))
        source = self.lm.layers[stage.signal_layer]
        cos, sin = source_kwargs["position_embeddings"]
        n = hidden.shape[1]
        view = PrefillView(image_mask=run.image_mask, anchor=run.anchor, prompt=run.prompt, marks=run.marks)
        attn = source.self_attn
        k_macs = linear_macs(attn.k_proj)
        if ANCHOR_ATTN in stage.needs:
            view.anchor_attn = anchor_attention(source, source_hidden, source_kwargs.get("attention_mask"), cos, sin,
                                                run.anchor)
            run.reducer_macs += n * k_macs + linear_macs(attn.q_proj) + n * attn.q_proj.out_features
        if TEXT_ATTN in stage.needs:
            view.text = text_rows(run.image_mask, run.prompt)
            rows = view.text.clamp_min(0)
            view.text_attn = query_attention(source, source_hidden, source_kwargs.get("attention_mask"), cos, sin,
                                             rows) * (view.text >= 0).view(rows.shape[0], 1, -1, 1)
            t = rows.shape[1]
            run.reducer_macs += n * k_macs + t * linear_macs(attn.q_proj) + t * n * attn.q_proj.out_features
        if LAYER_KEYS in stage.needs:
            view.layer_keys = layer_keys(source, source_hidden, cos, sin)
            run.reducer_macs += n * k_macs
        if NORMED_OUTPUT in stage.needs:
            view.normed_output = self.lm.norm(hidden)
        if HIDDEN in stage.needs:
            view.hidden = hidden
        if EMBEDDINGS in stage.needs:
            view.embeddings = _gather_tokens(run.embeddings, run.kept.clamp_min(0))
            if view.text is not None:  # the image-by-text products of a relevance
                run.reducer_macs += run.num_visual * view.text.shape[1] * hidden.shape[-1]
        if run.sample_counts is None:
            out = run.reducer.select(s, view, run.counts[s])
            keep = out if isinstance(out, PrefillKeep) else PrefillKeep(index=out)
        else:
            keep = select_each(run.reducer, s, view, [c and c[s] for c in run.sample_counts], hidden)
        index = keep.index  # [B, M] ascending positions of the current sequence; -1: a padding slot (left)
        source_index = index.clamp_min(0)
        new_pad = index < 0
        if keep.marks is not None:
            run.marks = keep.marks
        if run.marks is not None:
            run.marks = run.marks.gather(1, source_index) & ~new_pad
        run.image_mask = run.image_mask.gather(1, source_index) & ~new_pad
        run.prompt = run.prompt.gather(1, source_index) & ~new_pad
        run.valid = run.valid.gather(1, source_index) & ~new_pad
        run.anchor = (index < run.anchor.unsqueeze(1)).sum(dim=1)  # the anchor is text: always kept
        run.kept = run.kept.gather(1, source_index).masked_fill(new_pad, -1)
        cos, sin = kwargs["position_embeddings"]
        mask = _gather_mask(kwargs.get("attention_mask"), source_index)
        pad = run.kept < 0
        run.has_pads = bool(pad.any())
        if run.has_pads:
            mask = _mask_padding_slots(mask, pad, pad.shape[1], prefill=True)
        run.replaced = {
            "attention_mask": mask,
            "position_embeddings": (_gather_tokens(cos, source_index), _gather_tokens(sin, source_index)),
            "position_ids": None if kwargs.get("position_ids") is None else _gather_tokens(kwargs["position_ids"],
                                                                                            source_index),
        }
        if stage.renumber:  # each kept token moves down by the tokens dropped before it; padding slots 1
            dropped_before = source_index - ((~new_pad).long().cumsum(dim=1) - 1)
            positions = (run.replaced["position_ids"] - dropped_before).masked_fill(new_pad, 1)
            run.replaced["position_ids"] = positions
            run.replaced["position_embeddings"] = self.lm.rotary_emb(hidden, positions)
            run.renumbered = True
        kwargs.update(run.replaced)
        return (_gather_tokens(hidden, source_index) if keep.hidden is None else keep.hidden.to(hidden.dtype)), kwargs


def select_each(reducer, stage: int, view: PrefillView, counts: list, hidden: Tensor) -> PrefillKeep:
    """The reducer's selection sample by sample, for samples holding different numbers of image tokens
    (`counts`: each one's count at this stage; None: no image, every token stays), right-aligned into
    one answer: a sample that keeps fewer starts with padding slots (-1), as PrefillKeep allows."""
    b, n = view.image_mask.shape
    answers = []
    for i, count in enumerate(counts):
        if count is None:
            answers.append(PrefillKeep(index=torch.arange(n, device=view.image_mask.device).view(1, n)))
            continue
        out = reducer.select(stage, view.sample(i), count)
        answers.append(out if isinstance(out, PrefillKeep) else PrefillKeep(index=out))
    width = max(a.index.shape[1] for a in answers)
    index = torch.full((b, width), -1, dtype=torch.long, device=view.image_mask.device)
    for i, a in enumerate(answers):
        index[i, width - a.index.shape[1]:] = a.index[0]
    states = marks = None
    if any(a.hidden is not None for a in answers):  # the others' states are those of their kept positions
        states = _gather_tokens(hidden, index.clamp_min(0)).clone()
        for i, a in enumerate(answers):
            if a.hidden is not None:
                states[i, width - a.hidden.shape[1]:] = a.hidden[0].to(states.dtype)
    if any(a.marks is not None for a in answers):
        marks = torch.cat([a.marks if a.marks is not None else view.image_mask[i:i + 1] & False
                           for i, a in enumerate(answers)])
    return PrefillKeep(index=index, hidden=states, marks=marks)


# --- placement (b): the boundary between the vision tower and the language model ------------------------
@dataclass
class TowerPass:
    """One call of the patched get_image_features in flight: what the feature layer's hooks saw and,
    once the projector's pre-hook reduced them, the tokens kept per image."""

    inputs: Tensor | None = None  # [I, N, Dv] the feature layer's input
    output: Tensor | None = None  # [I, N, Dv] its output (the features, CLS included)
    counts: list[int] | None = None
    positions: Tensor | None = None  # [I, k] the tower token each kept token stands at (BoundaryTokens)
    views: int | None = None  # the images (LLaVA-NeXT: views) the reducer was given; None: not reduced here
    patches: int = 0  # patch tokens per image (LLaVA-NeXT: per view) before the reduction
    reducer_macs: int = 0


@dataclass
class BoundaryDecode:
    """What a boundary prefill did to a cache's sequence: the original prompt length, the shortened
    sequence's width and 2-D mask (None: all ones), and per sample the tokens removed before the
    end of the prompt (decode positions in the original numbering are shifted down by it)."""

    length: int
    width: int
    mask: Tensor | None
    shift: Tensor


class FeatureHook:
    """Forward pre-hook and forward hook of the vision tower's feature layer: keeps its input and output."""

    def __init__(self, patch: VLMPatch):
        self.patch = patch

    def before(self, layer: nn.Module, args: tuple, kwargs: dict):
        tower = getattr(self.patch.local, "tower", None)
        if tower is not None:
            tower.inputs = args[0] if args else kwargs["hidden_states"]

    def after(self, layer: nn.Module, args: tuple, kwargs: dict, output):
        tower = getattr(self.patch.local, "tower", None)
        if tower is not None:
            tower.output = output[0] if isinstance(output, tuple) else output


def cls_attention(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The CLS query's attention probabilities [I, H, N] in a CLIP encoder layer with input x, as
    eager attention computes them (softmax(q_cls k^T * head_dim^-1/2) in float32; the tower has no
    mask), and the layer's keys [I, H, N, d]."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    i, n, _ = h.shape
    q = attn.q_proj(h[:, :1]).view(i, 1, -1, attn.head_dim).transpose(1, 2)  # [I, H, 1, d]
    k = attn.k_proj(h).view(i, n, -1, attn.head_dim).transpose(1, 2)  # [I, H, N, d]
    logits = torch.matmul(q, k.transpose(2, 3)) * attn.scale
    return torch.softmax(logits, dim=-1, dtype=torch.float32).squeeze(2), k


def whole_cls_attention(layer: nn.Module, features: Tensor) -> tuple[Tensor, Tensor]:
    """PruMerge's signals from the CLIP layer that reads `features`: its query and key projections of
    layer_norm1(features) taken whole (one head of width C), the CLS row softmax(q_cls k^T / sqrt(C))
    [I, N] in float32, and the keys [I, N, C]."""
    attn = layer.self_attn
    h = layer.layer_norm1(features)
    q, k = attn.q_proj(h[:, :1]), attn.k_proj(h)
    logits = torch.matmul(q, k.transpose(1, 2)) * k.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1, dtype=torch.float32).squeeze(1), k


class ProjectorHook:
    """Forward pre-hook of the multi-modal projector: the features [I, V, Dv] become the reducer's
    tokens [I, k_max, Dv] (signals computed here from what the feature layer's hooks kept)."""

    def __init__(self, patch: VLMPatch, layers: nn.ModuleList):
        self.patch, self.layers = patch, layers

    def __call__(self, module: nn.Module, args: tuple):
        tower: TowerPass | None = getattr(self.patch.local, "tower", None)
        if tower is None:
            return None
        features = args[0]
        info: LanguageModelInfo = self.patch.info
        hidden = tower.output
        prefix = info.vision_prefix
        expected = hidden.shape[1] - (0 if info.feature_prefix else prefix) if hidden is not None else None
        if hidden is None or features.shape[:2] != (hidden.shape[0], expected):
            raise ConfigError(f"the image features {tuple(features.shape)} reaching the projector are not those of the "
                              f"vision tower's feature layer {info.feature_layer}; allowed: the model's own "
                              "get_image_features (one vision_feature_layer, as in its config)")
        reducer = self.patch.reducer
        needs = reducer.boundary_needs()
        view = BoundaryView(hidden=hidden, prefix=prefix, keeps_prefix=info.feature_prefix)
        i, n, _ = hidden.shape
        layer = self.layers[info.feature_layer]
        macs = 0
        if needs & {CLS_ATTENTION, FEATURE_KEYS}:
            view.cls_attention, view.feature_keys = cls_attention(layer, tower.inputs)
            macs += n * linear_macs(layer.self_attn.k_proj) + linear_macs(layer.self_attn.q_proj) + n * _key_width(layer)
        if needs & {NEXT_CLS_ATTENTION, NEXT_KEYS}:
            following = self.layers[info.feature_layer + 1]
            view.next_cls_attention, view.next_keys = whole_cls_attention(following, hidden)
            macs += (n * linear_macs(following.self_attn.k_proj) + linear_macs(following.self_attn.q_proj)
                     + n * _key_width(following))
        out = reducer.reduce_features(view)
        tower.counts = [int(c) for c in out.counts]
        tower.positions = out.positions
        tower.views = i
        tower.patches = features.shape[1]
        tower.reducer_macs = i * macs
        return (out.tokens.to(features.dtype),)


def _key_width(layer: nn.Module) -> int:
    return layer.self_attn.k_proj.out_features


def checked_image_features(patch: VLMPatch, original, body):
    """The patched get_image_features of the inner LlavaModel (LlavaNextModel), placements (a) and (b): the
    refusals of arguments the reduction cannot follow, before any compute, then body(*args, **kwargs).
    It keeps the original's signature (generate selects its arguments by it)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_image_features(*args, **kwargs):
        arguments = signature.bind_partial(*args, **kwargs).arguments  # a missing image_sizes is refused below
        extra = arguments.get("kwargs", {})
        check_vision_arguments(patch, arguments.get("vision_feature_layer"),
                               arguments.get("vision_feature_select_strategy"), arguments.get("image_sizes"))
        if extra.get("return_dict") is False:
            _refuse("return_dict=False", "the reduced features are cut per image in the output object",
                    "return_dict=True")
        refuse_outputs(patch.model_ref(), extra)
        return body(*args, **kwargs)

    return get_image_features


def boundary_image_features(patch: VLMPatch, original):
    """get_image_features under placement (b): the model's own, inside a TowerPass (so the feature
    layer's hooks and the projector's pre-hook reduce), each image's projected tokens cut to its count."""

    def reduced(*args, **kwargs):
        tower = TowerPass()
        previous = getattr(patch.local, "tower", None)
        patch.local.tower = tower
        try:
            out = original(*args, **kwargs)
        finally:
            patch.local.tower = previous
        if tower.counts is None:
            raise ConfigError("the multi-modal projector did not run in get_image_features; allowed: the model's own "
                              "LlavaModel.get_image_features")
        out.pooler_output = [f[:c] for f, c in zip(out.pooler_output, tower.counts, strict=True)]
        patch.local.tower_done = tower
        return out

    return checked_image_features(patch, original, reduced)


def tower_image_features(patch: VLMPatch, original):
    """get_image_features under placement (a): the model's own, whose tower (patched by hf_clip)
    returns the feature layer's merged tokens, so the projector gets and projects fewer tokens per
    image; each image's count is its feature count."""

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        config = patch.model_ref().config
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
        patch.local.tower_done = TowerPass(counts=[int(f.shape[0]) for f in out.pooler_output], patches=patches)
        return out

    return checked_image_features(patch, original, counted)


def tiled_image_features(patch: VLMPatch, original):
    """get_image_features of a LLaVA-NeXT under placement (b), in place of the model's own (whose
    unpadding and newline tokens need every patch of every tile): every view of every image (its base
    view, then its tiles) through the CLIP tower at once, each view's features reduced on their own by
    the projector's pre-hook, projected, and laid out per image by `tiled_layout`."""

    def reduced(pixel_values, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                **kwargs):  # the feature layer and strategy: checked by checked_image_features
        model = patch.model_ref()
        config = model.config
        views, grids = image_tiles(model, pixel_values, image_sizes)
        if pixel_values.dim() == 5:  # [images, views of the most tiled image, C, H, W]: each image's own views
            pixel_values = torch.cat([p[:v] for p, v in zip(pixel_values, views, strict=True)])
        kwargs.pop("return_dict", None)
        tower = TowerPass()
        previous = getattr(patch.local, "tower", None)
        patch.local.tower = tower
        try:
            out = model.model.vision_tower(pixel_values, return_dict=True, **kwargs)
            features = tower.output if config.vision_feature_select_strategy == "full" else tower.output[:, 1:]
            projected = model.model.multi_modal_projector(features)  # the pre-hook reduces each view
        finally:
            patch.local.tower = previous
        if tower.positions is None:
            raise ConfigError(f"reducer {patch.reducer.name!r} does not say which patch each of its tokens stands at "
                              "(BoundaryTokens.positions), by which a tiled image's tokens are laid out; allowed: "
                              + ", ".join(map(repr, BOUNDARY_REDUCERS)))
        side = config.vision_config.image_size // config.vision_config.patch_size
        out.pooler_output = tiled_layout(projected, tower.counts, tower.positions, views, grids, side,
                                         patch.info.vision_prefix)
        patch.local.tower_done = tower
        return out

    return checked_image_features(patch, original, reduced)


def image_tiles(model: nn.Module, pixel_values, image_sizes) -> tuple[list[int], list[tuple[int, int]]]:
    """Each image's views (its base view and its tiles) and its grid of tiles (rows, columns), as
    LLaVA-NeXT reads them from image_sizes; a ConfigError, before any compute, where image_sizes and
    pixel_values do not fit one another."""
    config = model.config
    if not isinstance(pixel_values, Tensor) or pixel_values.dim() not in (4, 5):
        _refuse(f"pixel_values of shape {tuple(getattr(pixel_values, 'shape', ()))}", "each image's views are "
                "reduced one by one", "[images, views, C, H, W] or [views, C, H, W] (the processor's)")
    allowed = "one (height, width) of positive integers per image (the processor's image_sizes)"
    if image_sizes is None:
        _refuse("image_sizes=None", "each image's tiles and their grid follow its size", allowed)
    sizes = torch.as_tensor(image_sizes)
    stacked = pixel_values.dim() == 5
    if sizes.dim() != 2 or sizes.shape[1] != 2 or sizes.is_floating_point() or bool((sizes < 1).any()) \
            or (stacked and sizes.shape[0] != pixel_values.shape[0]):
        held = f"pixel_values hold {pixel_values.shape[0]} images" if stacked else "pixel_values are views"
        _refuse(f"image_sizes={sizes.tolist()}", f"{held}, whose tiles follow their sizes", allowed)
    next_model = modeling("llava_next")
    pinpoints, size = config.image_grid_pinpoints, config.vision_config.image_size
    views = [next_model.image_size_to_num_patches(image_size=s, grid_pinpoints=pinpoints, patch_size=size)
             for s in sizes.tolist()]
    held = pixel_values.shape[1] if stacked else pixel_values.shape[0]
    if (stacked and max(views, default=0) > held) or (not stacked and sum(views) != held):
        _refuse(f"image_sizes={sizes.tolist()}", f"images of those sizes have {views} views (a base view and its "
                f"tiles), but pixel_values hold {'at most ' if stacked else ''}{held}"
                f"{' per image' if stacked else ' in all'}", allowed + ", matching pixel_values")
    grids = [tuple(next_model.get_anyres_image_grid_shape(s, pinpoints, size)) for s in sizes.tolist()]
    return views, grids


def tiled_layout(projected: Tensor, counts: list[int], positions: Tensor, views: list[int],
                 grids: list[tuple[int, int]], side: int, prefix: int) -> list[Tensor]:
    """Each image's tokens [k_i, D] from the reduced tokens of its views (projected [T, k, D], the
    views image by image, each image's base view first, then its tiles in row-major order of its grid;
    counts[t] real tokens of view t; positions [T, k] the tower token each stands at, -1 for none):
    the base view's tokens as the reducer gives them; then the tiles' tokens that stand at a patch,
    each put at that patch's place in the image's whole grid (rows * side by columns * side patches)
    and read in raster order of it; then the tiles' CLS tokens, tile by tile; then their merged
    tokens, tile by tile, in the reducer's order. No unpadding and no newline tokens."""
    k = projected.shape[1]
    slot = torch.arange(k, device=projected.device)
    kept = slot < torch.tensor(counts, device=projected.device).unsqueeze(1)  # [T, k] the real tokens
    out, start = [], 0
    for n, (rows, cols) in zip(views, grids, strict=True):
        base, tiles = start, slice(start + 1, start + n)
        start += n
        at = positions[tiles]
        tile = torch.arange(n - 1, device=projected.device).unsqueeze(1)
        patch = at - prefix
        place = ((tile // cols) * side + patch // side) * (cols * side) + (tile % cols) * side + patch % side
        grid = rows * cols * side * side
        # one sort key: the grid's places, then the CLS tokens (tile by tile), then the merged tokens
        key = torch.where(patch >= 0, place, torch.where(at >= 0, grid + tile * prefix + at,
                                                          grid + (n - 1) * prefix + tile * k + slot))
        real = kept[tiles]
        order = key[real].argsort()
        out.append(torch.cat([projected[base][kept[base]], projected[tiles][real][order]]))
    return out


def tower_facts(model: nn.Module, reducer) -> ModelInfo:
    """The facts of a LLaVA's vision tower for a reducer placed inside it (placement (a)), from hf_clip;
    ConfigError naming what is missing (a tower hf_clip cannot reduce, one already reduced on its own,
    a feature layer that is not one int, an unknown strategy)."""
    ours = is_patched(model) and model._tokenreduce.in_tower  # re-applying: the tower carries our reducer
    cls = model._tokenreduce.original_class if is_patched(model) else type(model)
    name = cls.__name__
    if family_of(cls) != LLAVA:
        raise ConfigError(f"reducer {reducer.name!r} merges in a vision tower, which tokenreduce does in the LLaVA-1.5 "
                          f"layout ({LLAVA}) only, not in {name}'s (tiled images, or Qwen's packed patches); allowed: "
                          + ", ".join(map(repr, REDUCERS)) + " (inside the language model)")
    tower = model.model.vision_tower
    clip = adapters()["hf_clip"]
    allowed = "the CLIP/SigLIP tower reducers, or " + ", ".join(map(repr, REDUCERS + BOUNDARY_REDUCERS))
    if is_patched(tower) and not ours:
        raise ConfigError(f"reducer {reducer.name!r}: the vision tower of {name} already carries a reducer of its own; "
                          "allowed: tokenreduce.remove(model.model.vision_tower) first")
    if not clip.claims(tower):
        raise ConfigError(f"reducer {reducer.name!r} merges in a vision tower, but {name}'s is a "
                          f"{type(tower).__name__}, which the CLIP/SigLIP adapter (hf_clip) does not reduce; allowed: "
                          + allowed)
    config = model.config
    if not isinstance(config.vision_feature_layer, int) or isinstance(config.vision_feature_layer, bool) \
            or config.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"reducer {reducer.name!r} in the vision tower of {name}: vision_feature_layer="
                          f"{config.vision_feature_layer!r} with strategy {config.vision_feature_select_strategy!r}; "
                          "allowed: one int feature layer with strategy 'default' or 'full'")
    if ours:
        return tower._tokenreduce.info
    try:
        return clip.describe(tower)
    except UnsupportedModelError as error:
        raise ConfigError(f"reducer {reducer.name!r} in the vision tower of {name}: {error}") from error


def is_tower_reducer(reducer) -> bool:
    """Whether `reducer` is a vision reducer placed in the tower (not one of the language model's or the
    boundary's, not 'none')."""
    return not (is_prefill_reducer(reducer) or is_boundary_reducer(reducer) or reducer.name == "none")


def check_vision_arguments(patch: VLMPatch, layer, strategy, image_sizes) -> None:
    config = patch.model_ref().config
    if layer is not None and layer != config.vision_feature_layer:
        _refuse(f"vision_feature_layer={layer!r}", "the reducer's signals are hooked on the config's feature layer",
                f"None or {config.vision_feature_layer!r}")
    if strategy is not None and strategy != config.vision_feature_select_strategy:
        _refuse(f"vision_feature_select_strategy={strategy!r}", "the reducer follows the config's strategy",
                f"None or {config.vision_feature_select_strategy!r}")
    if image_sizes is not None and patch.family == LLAVA:  # LLaVA-NeXT's are checked with its pixel values
        _refuse("image_sizes", "the features of one image are one run of placeholder tokens (LLaVA-1.5)",
                "image_sizes=None")


def cut_placeholders(placeholder: Tensor, counts: list[int], equal_runs: bool) -> Tensor:
    """The placeholder tokens [B, N] bool cut when image i keeps the first `counts[i]` of its run. The
    placeholders in row-major order (batch, then sequence) are the images' runs, as transformers fills
    them: `equal_runs` (LLaVA-1.5), runs of V each, two images side by side included; otherwise
    (LLaVA-NeXT, whose runs follow each image's size) the contiguous segments, one per image."""
    b, n = placeholder.shape
    flat = placeholder.flatten()
    total, images = int(flat.sum()), len(counts)
    if equal_runs:
        lengths = [total // images] * images if images and total % images == 0 else []
        shape = "one of the same length per image"
    else:
        starts = (placeholder & ~torch.nn.functional.pad(placeholder[:, :-1], (1, 0), value=False)).flatten()
        lengths = torch.bincount((starts.long().cumsum(0) - 1)[flat], minlength=int(starts.sum())).tolist()
        shape = "one per image, in order, with text between two images"
    if len(lengths) != images or any(c > length for c, length in zip(counts, lengths, strict=True)):
        _refuse(f"a batch with {total} image placeholder tokens in runs of {lengths} for {images} images of {counts} "
                "tokens", "each image's run of placeholder tokens is cut to its kept tokens",
                f"the processor's placeholder runs, {shape}, each at least as long as its image's kept tokens")
    ordinal = flat.long().cumsum(0) - 1  # each placeholder's place among all
    length = torch.tensor(lengths, dtype=torch.long, device=placeholder.device)
    ends = length.cumsum(0)
    run = torch.searchsorted(ends, ordinal, right=True).clamp_max(images - 1)
    offset = ordinal - (ends - length)[run]  # its place in its run
    limit = torch.tensor(counts, dtype=torch.long, device=placeholder.device)[run]
    return (flat & (offset >= limit)).view(b, n)


def left_padded(keep: Tensor) -> Tensor:
    """index [B, W] of each sample's kept positions (keep [B, N] bool), right-aligned: -1 (left
    padding) where a sample keeps fewer than the widest."""
    b, n = keep.shape
    length = keep.sum(dim=1)
    width = int(length.max()) if b else 0
    slot = keep.long().cumsum(1) - 1 + (width - length).unsqueeze(1)
    index = torch.full((b, width + 1), -1, dtype=torch.long, device=keep.device)
    position = torch.arange(n, device=keep.device).expand(b, n)
    index.scatter_(1, torch.where(keep, slot, width), position)
    return index[:, :width]


# --- the model's forward and generate ---------------------------------------------------------------
def _refuse(what: str, why: str, allowed: str):
    raise ConfigError(f"{what} is not supported on a token-reduced vision-language model: {why}; allowed: {allowed}")


def cache_classes() -> tuple[type, type]:
    """transformers' DynamicCache and DynamicLayer."""
    module = import_transformers("transformers.cache_utils")
    return module.DynamicCache, module.DynamicLayer


def check_cache(cache) -> None:
    dynamic, layer_cls = cache_classes()
    if type(cache) is not dynamic or any(type(layer) is not layer_cls for layer in cache.layers) \
            or getattr(cache, "offloading", False):
        _refuse(f"cache={type(cache).__name__}", "the layers after a drop hold fewer entries than the first, which "
                "only a plain DynamicCache of full-attention layers keeps", "a DynamicCache (the default), or none")


def decode_entry(patch: VLMPatch, cache, arguments: dict, cut: str):
    """What the reduced prefill that filled the non-empty `cache` stored for the decode steps (Decode,
    BoundaryDecode); ConfigError for a cache no reduced prefill filled (its layers hold every token)
    or for images after the prefill (`cut`: what the prefill cut of them)."""
    entry = patch.caches.get(cache)
    if entry is None:
        _refuse("a non-empty cache not filled by a reduced prefill", "its layers hold every token",
                "an empty cache, or the cache a reduced pass returned")
    if any(arguments.get(name) is not None for name in ENCODERS.values()) or arguments.get("mm_encoder_outputs"):
        _refuse("images after the prefill", f"the {cut} are cut in the prefill only", "pixel_values in the first pass")
    return entry


class ReducedVLM:
    """The methods a patched LlavaForConditionalGeneration takes in front of its own."""

    def _tr_forward(self, original, *args, **kwargs):
        arguments, extra = bind(original, self, args, kwargs)
        patch: VLMPatch = self._tokenreduce
        refuse_outputs(self, extra)
        lm = language_model(self)
        check_attention_implementation(type(self).__name__, lm.config,
                                       why="the kept tokens' 4-D mask is gathered, which these take")
        if arguments.get("labels") is not None:
            _refuse("labels", "the logits are those of the kept positions, fewer than the labels", "labels=None "
                    "(compute the loss on the logits and tokenreduce.stats(model)['kept'])")
        if "past_key_values" in extra:
            arguments["cache"] = extra.pop("past_key_values")
        cache = arguments.get("cache")
        if cache is not None:
            check_cache(cache)
        if patch.boundary:
            return self._tr_boundary(original, arguments, extra)
        if cache is not None and cache.get_seq_length() > 0:
            return self._tr_run(original, arguments, extra, decode_entry(patch, cache, arguments, "image tokens"))
        input_ids = arguments.get("input_ids")
        if input_ids is None:
            _refuse("inputs_embeds without input_ids", "the image tokens are found by their placeholder id",
                    "input_ids")
        b, n = input_ids.shape
        prompt = getattr(patch.local, "prompt", None) or n
        image_mask = torch.isin(input_ids, torch.tensor(visual_token_ids(self), device=input_ids.device))
        image_mask[:, prompt:] = False
        per_sample = image_mask.sum(dim=1).tolist()
        num_visual = max(per_sample, default=0)
        reducer = self.token_reducer
        stages = reducer.prefill_stages() if is_prefill_reducer(reducer) and num_visual else []
        for v in sorted(set(per_sample) - {0}) if stages else ():
            reducer.check_visual(v)
        mask2d = arguments.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask2d is None else mask2d.bool()
        position = torch.arange(n, device=input_ids.device)
        if stages:
            reducer.check_prompt(image_mask, valid & (position < prompt))
        anchor = torch.where(valid[:, :prompt], position[:prompt], -1).amax(dim=1) if b else position[:0]
        if b and bool((anchor < 0).any()):
            _refuse("a sample whose prompt is all padding", "it has no last prompt token to rank by",
                    "at least one real token per sample")
        use_cache = arguments.get("use_cache", extra.get("use_cache"))
        if cache is None and (use_cache if use_cache is not None else lm.config.use_cache):
            cache = arguments["cache"] = cache_classes()[0](config=lm.config)
        run = Prefill(reducer=reducer, stages=stages, counts=reducer.visual_counts(num_visual) if stages else [],
                      image_mask=image_mask, anchor=anchor, prompt=valid & (position < prompt), kept=position.expand(b, n),
                      num_visual=num_visual, valid=valid, valid_total=valid.sum(dim=1))
        if stages and len(set(per_sample)) > 1:  # each sample's own counts; None: a sample without an image
            run.sample_counts = [reducer.visual_counts(v) if v else None for v in per_sample]
        if getattr(patch.local, "prompt", None) is None:  # outside generate, only this pass's images count
            patch.local.vision = []
        out = self._tr_run(original, arguments, extra, run)
        if cache is not None:
            patch.caches[cache] = Decode(kept_at=run.kept_at, padded=run.padded,
                                         shifts=run.shifts if run.renumbered else None)
        patch.last_state = prefill_state(run)
        # the images and videos this pass (or the generate call it belongs to) encoded; none: given the features
        patch.last_state.extras["vision_inputs"] = list(getattr(patch.local, "vision", None) or []) if num_visual else []
        return out

    def _tr_boundary(self, original, arguments: dict, extra: dict):
        """Placement (b): the features come reduced from the patched get_image_features; each image's
        placeholder run is cut to its kept count, the batch re-left-padded, the mask and position ids
        carried; decode steps get the mask and positions of the shortened sequence."""
        patch: VLMPatch = self._tokenreduce
        cache = arguments.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            entry = decode_entry(patch, cache, arguments, "image features")
            return original(self, **self._tr_continue(entry, arguments, cache), **extra)
        input_ids = arguments.get("input_ids")
        if input_ids is None:
            _refuse("inputs_embeds without input_ids", "each image's placeholder run is found by its id and cut",
                    "input_ids")
        check_vision_arguments(patch, arguments.get("vision_feature_layer"),
                               arguments.get("vision_feature_select_strategy"), arguments.get("image_sizes"))
        encoded = dict(arguments.get("mm_encoder_outputs") or {})
        pixel_values = arguments.get("pixel_values")
        if pixel_values is not None and encoded.get("image") is None:
            encoded["image"] = self.model.get_image_features(pixel_values=pixel_values,
                                                             image_sizes=arguments.get("image_sizes"), return_dict=True)
            arguments["pixel_values"], arguments["mm_encoder_outputs"] = None, encoded
        image = encoded.get("image")
        b, n = input_ids.shape
        prompt = getattr(patch.local, "prompt", None) or n
        placeholder = input_ids == patch.info.image_token_id
        placeholder[:, prompt:] = False
        tower = getattr(patch.local, "tower_done", None)
        if getattr(patch.local, "prompt", None) is None:  # outside generate, only this pass's own tower run counts
            patch.local.tower_done = None
        counts = [] if image is None else [int(f.shape[0]) for f in image.pooler_output]
        cut = cut_placeholders(placeholder, counts, patch.family == LLAVA) if counts else torch.zeros_like(placeholder)
        mask = arguments.get("attention_mask")
        # the kept tokens: every real one but the cut placeholders; padding is made again on the left
        keep = ~cut if mask is None or not bool(cut.any()) else ~cut & mask.bool()
        index = left_padded(keep)
        pad = index < 0
        source = index.clamp_min(0)
        width = index.shape[1]
        removed = cut.sum(dim=1)
        pad_id = 1 if patch.info.image_token_id == 0 else 0
        arguments["input_ids"] = input_ids.gather(1, source).masked_fill(pad, pad_id)
        if mask is not None:
            mask = mask.gather(1, source).masked_fill(pad, 0)
        elif bool(pad.any()):
            mask = (~pad).long()
        arguments["attention_mask"] = mask
        positions = arguments.get("position_ids")
        if positions is not None:  # shifted down by the cut placeholders before each token
            positions = positions.expand(b, n) - cut.long().cumsum(dim=1)
            arguments["position_ids"] = positions.gather(1, source).masked_fill(pad, 1)
        use_cache = arguments.get("use_cache", extra.get("use_cache"))
        lm = language_model(self)
        if cache is None and (use_cache if use_cache is not None else lm.config.use_cache):
            cache = arguments["cache"] = cache_classes()[0](config=lm.config)
        out = original(self, **arguments, **extra)
        if cache is not None:
            patch.caches[cache] = BoundaryDecode(length=n, width=width, mask=mask, shift=removed)
        patch.last_state = boundary_state(self, placeholder, keep, index, counts, tower)
        return out

    def _tr_continue(self, entry: BoundaryDecode, arguments: dict, cache) -> dict:
        """A step continuing a boundary prefill's cache: the 2-D mask in the original numbering (the
        prompt's length plus the tokens since) becomes the shortened prefill's mask plus those tokens;
        positions in the original numbering are shifted down by each sample's removed tokens."""
        ids = arguments.get("input_ids")
        embeds = arguments.get("inputs_embeds")
        b, q = (ids if ids is not None else embeds).shape[:2]
        tail = cache.get_seq_length() - entry.width + q  # tokens after the prefill, this step's included
        mask = arguments.get("attention_mask")
        if mask is not None:
            if mask.shape[-1] != entry.length + tail:
                _refuse(f"an attention_mask of {mask.shape[-1]} columns", "a step after a reduced prefill takes the "
                        "mask of the original prompt and the tokens since", f"{entry.length + tail} columns")
            prefix = entry.mask if entry.mask is not None else mask.new_ones(b, entry.width)
            arguments["attention_mask"] = torch.cat([prefix.to(mask.dtype), mask[:, entry.length:]], dim=1)
        elif entry.mask is not None:
            arguments["attention_mask"] = torch.cat([entry.mask, entry.mask.new_ones(b, tail)], dim=1)
        positions = arguments.get("position_ids")
        if positions is not None:
            arguments["position_ids"] = positions - entry.shift.view(b, *([1] * (positions.dim() - 1)))
        return arguments

    def _tr_run(self, original, arguments: dict, extra: dict, run):
        local = self._tokenreduce.local
        previous = getattr(local, "run", None)
        local.run = run
        try:
            return original(self, **arguments, **extra)
        finally:
            local.run = previous

    def generate(self, *args, **kwargs):
        patch: VLMPatch = self._tokenreduce
        settings = {k: v for k, v in kwargs.items() if k != "generation_config"}
        config, _ = self._prepare_generation_config(kwargs.get("generation_config"), **settings)
        checks = (("num_beams", config.num_beams, 1), ("num_return_sequences", config.num_return_sequences, 1))
        for name, value, allowed in checks:
            if value is not None and value != allowed:
                _refuse(f"{name}={value}", "the reduced image features and caches are not expanded per beam or "
                        "sequence", f"{name}={allowed}")
        if getattr(config, "prefill_chunk_size", None) is not None:
            _refuse(f"prefill_chunk_size={config.prefill_chunk_size}", "the tokens are dropped in one prefill",
                    "prefill_chunk_size=None")
        if config.cache_implementation not in (None, "dynamic"):
            _refuse(f"cache_implementation={config.cache_implementation!r}", "the layers after a drop hold fewer "
                    "entries than the first, which only a DynamicCache keeps", "None or 'dynamic'")
        if kwargs.get("assistant_model") is not None or getattr(config, "prompt_lookup_num_tokens", None):
            _refuse("assisted decoding", "the candidate tokens would be checked by a different prefill",
                    "assistant_model=None")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            check_cache(cache)
            if cache.get_seq_length() > 0:
                _refuse("a non-empty cache", "generation starts with a reduced prefill", "no cache, or an empty one")
        inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        if inputs is None:
            _refuse("generate without input_ids", "the image tokens are found by their placeholder id", "input_ids")
        previous = getattr(patch.local, "prompt", None)
        patch.local.prompt = inputs.shape[1]
        patch.local.vision, patch.local.tower_done = [], None
        try:
            return super().generate(*args, **kwargs)
        finally:
            patch.local.prompt = previous
            patch.local.tower_done = None


# --- what a pass did -----------------------------------------------------------------------------------
def prefill_state(run: Prefill) -> ReductionState:
    state = ReductionState(num_prefix=0, removals=[])
    state.records = [LayerRecord(tokens_attn=t, tokens_mlp=t, tokens_in=e)
                     for e, t in zip(run.entering, run.tokens, strict=True)]
    state.final_tokens = run.tokens[-1] if run.tokens else 0
    state.extras.update(visual=[max(row, default=0) for row in run.visual_rows], kept=run.kept,
                        image_tokens=run.num_visual,
                        visual_by_sample=[list(row) for row in zip(*run.visual_rows, strict=True)],
                        visual_per_sample=run.image_mask.sum(dim=1).tolist(), reducer_macs=run.reducer_macs)
    return state


def boundary_state(model: nn.Module, placeholder: Tensor, keep: Tensor, index: Tensor, counts: list[int],
                   tower: TowerPass | None) -> ReductionState:
    """What a boundary pass did: every decoder layer runs the shortened sequence (its width: the
    longest sample); the image tokens per sample entering the language model."""
    depth = len(language_model(model).layers)
    n, width = keep.shape[1], index.shape[1]
    state = ReductionState(num_prefix=0, removals=[])
    state.records = [LayerRecord(tokens_attn=width, tokens_mlp=width, tokens_in=n if i == 0 else width)
                     for i in range(depth)]
    state.final_tokens = width
    per_sample = (placeholder & keep).sum(dim=1).tolist()
    visual = max(per_sample) if per_sample else 0
    b = max(keep.shape[0], 1)
    state.extras.update(visual=[visual] * depth, kept=index, image_tokens=int(placeholder.sum(dim=1).max()) if
                        placeholder.shape[0] else 0, visual_per_sample=per_sample, visual_per_image=list(counts),
                        image_patches=tower.patches if tower is not None else None,
                        views=tower.views if tower is not None else None,
                        reducer_macs=tower.reducer_macs // b if tower is not None else 0)
    return state


def prefill_macs(model: nn.Module, state: ReductionState, tower: dict | None = None) -> dict[str, int]:
    """MACs of one sample's prefill by part: the vision tower on the sample's images (`tower`: the
    reduced tower's stats, per image; else the unreduced tower's), the projector on the image
    features it is given, the language model's decoder layers and the reducer's signals
    (`pass_macs`); the language-model head is left out (generate computes it for one position)."""
    lm = pass_macs(model, state)
    patch = model._tokenreduce
    if patch.family != LLAVA and not patch.boundary:
        return counted_prefill_macs(model, state, lm)
    info = patch.info
    extras = state.extras
    if "visual_per_image" in extras:  # boundary and tower: each image's count is known
        samples = max(len(extras["visual_per_sample"]), 1)
        images, projected = len(extras["visual_per_image"]), sum(extras["visual_per_image"])
        if patch.family != LLAVA:  # LLaVA-NeXT: the tower ran once per view; not at all for a pass given the features
            views = extras.get("views")
            images, projected = (views, projected) if views is not None else (0, 0)
        images, projected = images / samples, projected / samples
    else:  # the projector ran on every feature; the cut (if any) came inside the language model
        entering = [row[0] for row in extras.get("visual_by_sample", []) if row]  # each sample's image tokens
        projected = sum(entering) / len(entering) if entering else extras["image_tokens"]
        images = projected / info.image_features if info.image_features else 0
    vision = model.model.vision_tower
    per_image = tower["macs"] if tower is not None else adapters()["hf_clip"].unreduced_macs(vision)["total"]
    parts = {"vision_tower": round(images * per_image),
             "projector": round(projected * linear_macs(model.model.multi_modal_projector)),
             "blocks": lm["blocks"], "reducer": lm["reducer"]}
    return {**parts, "total": sum(parts.values())}


def counted_prefill_macs(model: nn.Module, state: ReductionState, lm: dict[str, int]) -> dict[str, int]:
    """prefill_macs of a tiled or Qwen model: the vision tower and projector counted on the images and
    videos the pass encoded (hf_vlm_families.counted_vision_macs, once per shape), per sample of the
    batch; 0 for a pass given the features."""
    patch = model._tokenreduce
    parts = {"vision_tower": 0, "projector": 0}
    samples = max(len(state.extras["visual_per_sample"]), 1)
    encoded: list[VisionInputs] = state.extras.get("vision_inputs") or []
    for inputs in encoded:
        key = inputs.key()
        if key not in patch.vision_costs:
            patch.vision_costs[key] = counted_vision_macs(model, patch.family, inputs)
        for part, macs in patch.vision_costs[key].items():
            parts[part] += macs
    parts = {part: round(macs / samples) for part, macs in parts.items()}
    parts.update(blocks=lm["blocks"], reducer=lm["reducer"])
    return {**parts, "total": sum(parts.values())}


def decode_macs(model: nn.Module, state: ReductionState) -> int:
    """MACs of the first token decoded after the prefill, per sample: every decoder layer's linear
    layers, its q.k^T and attention.v over the cache that layer holds (the prompt tokens it ran)
    and the new token, and the language-model head."""
    lm = language_model(model)
    total = linear_macs(model.lm_head)
    for layer, rec in zip(lm.layers, state.records, strict=False):
        attn_dim = layer.self_attn.q_proj.out_features
        total += linear_macs(layer.self_attn) + linear_macs(layer.mlp) + 2 * (rec.tokens_attn + 1) * attn_dim
    return total


def probe_inputs(model: nn.Module) -> dict:
    """One prompt for a cost probe (`cost.probe_pass`); the tiled and Qwen models' from hf_vlm_families,
    whose placeholder run is as long as the unreduced model's features."""
    family = model_family(model)
    return llava_probe_inputs(model) if family == LLAVA else family_probe_inputs(model, family)


def model_family(model: nn.Module) -> str:
    """The supported class `model` is (hf_vlm_families.FAMILIES), patched or not."""
    return model._tokenreduce.family if is_patched(model) else family_of(type(model))


def llava_probe_inputs(model: nn.Module) -> dict:
    """One prompt for a cost probe (`cost.probe_pass`): a seeded random image of the tower's size and
    its placeholder run between a few text tokens (token counts do not depend on the content, but
    for PruMerge's, which adapt to the image)."""
    info = facts_of(model)
    vision = model.config.vision_config
    param = next(model.parameters())
    text = next(t for t in range(3) if t not in (info.image_token_id, model.config.text_config.pad_token_id))
    ids = [text] * 4 + [info.image_token_id] * info.image_features + [text] * 8
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": torch.tensor([ids], device=param.device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=param.device),
            "pixel_values": pixels.to(device=param.device, dtype=param.dtype)}


def pass_macs(model: nn.Module, state: ReductionState) -> dict[str, int]:
    """MACs of one sample's prefill through the language model's decoder layers: each layer's
    linear layers per token, q.k^T and attention.v (N * N * heads * head_dim each), and the
    reducer's signals."""
    lm = language_model(model)
    blocks = 0
    for layer, rec in zip(lm.layers, state.records, strict=False):
        n = rec.tokens_attn
        attn_dim = layer.self_attn.q_proj.out_features
        blocks += n * (linear_macs(layer.self_attn) + linear_macs(layer.mlp)) + 2 * n * n * attn_dim
    reducer = state.extras.get("reducer_macs", 0)
    return {"blocks": blocks, "reducer": reducer, "total": blocks + reducer}


@register_adapter("hf_vlm")
class VLMAdapter(HFAdapterBase):
    family = ("Hugging Face transformers vision-language models, visual tokens dropped in the language model's "
              "prefill (" + ", ".join(SUPPORTED) + "; reducers: "
              + ", ".join(REDUCERS) + ") or shrunk between the vision tower and the language model (LLaVA-1.5 and "
              "LLaVA-NeXT with a CLIP tower; reducers: " + ", ".join(BOUNDARY_REDUCERS) + ") or merged inside the CLIP "
              "tower (LLaVA-1.5; the CLIP adapter's reducers)")
    reduced_methods = ReducedVLM
    claimed_class = staticmethod(_claimed_class)
    model_info = staticmethod(describe)
    model_macs = staticmethod(pass_macs)

    def check_reducer(self, model: nn.Module, reducer, info: LanguageModelInfo, options: dict) -> None:
        if is_tower_reducer(reducer):  # placement (a): the tower must be one hf_clip reduces
            tower_facts(model, reducer)
        family = family_of(type(model))
        if is_boundary_reducer(reducer) and family in NO_BOUNDARY:
            inside = ", ".join(repr(r) for r in REDUCERS if r != "none")
            raise ConfigError(f"{reducer.name}: model {info.name} cannot take a reducer at the boundary between its vision "
                              f"tower and its language model: {NO_BOUNDARY[family]}; allowed: the language-model "
                              f"reducers {inside} on this model, or {reducer.name!r} on {LLAVA} or {LLAVA_NEXT} with "
                              "a CLIP vision tower")
        renumbers = is_prefill_reducer(reducer) and any(stage.renumber for stage in reducer.prefill_stages())
        if renumbers and family in QWEN:
            raise ConfigError(f"{reducer.name}: renumber=True on {type(model).__name__}, whose positions are 3-D (time, "
                              "height, width) and have no renumbering; allowed: renumber=False")

    def reducer_info(self, model: nn.Module, reducer, info: LanguageModelInfo):
        return tower_facts(model, reducer) if is_tower_reducer(reducer) else info

    def patch(self, model: nn.Module, reducer, info: LanguageModelInfo, options: dict) -> None:
        patch = VLMPatch(adapter=self, original_class=type(model), info=info, options=options,
                         family=family_of(type(model)))
        if is_tower_reducer(reducer):  # placement (a): hf_clip reduces the tower; the boundary's bookkeeping
            patch.boundary = patch.in_tower = True
            patch.reducer = reducer
            patch.model_ref = weakref.ref(model)
            clip = adapters()["hf_clip"]
            tower = model.model.vision_tower
            clip.patch(tower, reducer, clip.describe(tower), clip.check_options(None))
            inner = model.model
            inner.get_image_features = tower_image_features(patch, inner.get_image_features)
        elif is_boundary_reducer(reducer):
            patch.boundary = True
            patch.reducer = reducer
            patch.model_ref = weakref.ref(model)
            layers = vision_layers(model)
            feature = layers[info.feature_layer]
            hook = FeatureHook(patch)
            patch.handles = [feature.register_forward_pre_hook(hook.before, with_kwargs=True),
                             feature.register_forward_hook(hook.after, with_kwargs=True),
                             model.model.multi_modal_projector.register_forward_pre_hook(ProjectorHook(patch, layers))]
            inner = model.model
            wrap = tiled_image_features if patch.family == LLAVA_NEXT else boundary_image_features
            inner.get_image_features = wrap(patch, inner.get_image_features)
        else:
            lm = language_model(model)
            patch.handles = [layer.register_forward_pre_hook(LayerHook(patch, lm, i), with_kwargs=True)
                             for i, layer in enumerate(lm.layers)]
            if patch.family != LLAVA:  # the tower's MACs are counted on the images and videos each pass encodes
                inner = model.model

                def record(inputs):
                    patch.local.vision = [*(getattr(patch.local, "vision", None) or []), inputs]

                for method in ENCODERS:
                    if hasattr(inner, method):
                        setattr(inner, method, recording_features(record, getattr(inner, method)))
        model._tokenreduce = patch
        model.token_reducer = reducer
        model.__class__ = self._reduced_class(type(model))

    def unpatch(self, model: nn.Module) -> None:
        for handle in model._tokenreduce.handles:
            handle.remove()
        for method in ENCODERS:
            if method in vars(model.model):
                delattr(model.model, method)  # the instance's override; the class's method shows again
        if model._tokenreduce.in_tower:
            tower = model.model.vision_tower
            tower._tokenreduce.adapter.unpatch(tower)
        super().unpatch(model)

    def pass_stats(self, model: nn.Module, state: ReductionState) -> dict:
        tower = tower_stats(model) if model._tokenreduce.in_tower else None
        macs = prefill_macs(model, state, tower)
        stats = {"tokens": state.tokens_per_layer(), "removed": [r.tokens_in - r.tokens_attn for r in state.records],
                 "visual_tokens": state.extras["visual"], "image_tokens": state.extras["image_tokens"],
                 "kept": state.extras["kept"], "macs": macs["total"], "macs_parts": macs,
                 "decode_macs": decode_macs(model, state), "source": None}
        for key in ("visual_per_sample", "visual_by_sample", "visual_per_image", "image_patches"):
            if key in state.extras:
                stats[key] = state.extras[key]
        if tower is not None:
            stats["tower"] = tower
        return stats

    def probe_inputs(self, model: nn.Module) -> dict:
        return probe_inputs(model)

    def token_bound(self, model: nn.Module) -> int:
        """The image tokens of the probe prompt (LLaVA-1.5: its features per image)."""
        info = facts_of(model)
        if model_family(model) == LLAVA and info.image_features > 0:
            return info.image_features
        return int((probe_inputs(model)["input_ids"] == info.image_token_id).sum())


def tower_stats(model: nn.Module) -> dict | None:
    """Under placement (a): the vision tower's own stats (hf_clip's, per image) of its last pass, with
    `feature_tokens`, the tokens (CLS included) leaving the feature layer; None before a pass."""
    tower = model.model.vision_tower
    state = tower._tokenreduce.last_state
    if state is None:
        return None
    adapter = tower._tokenreduce.adapter
    out = adapter.pass_stats(tower, state)
    if out is None:
        out = adapter.chain_stats(tower, state)
    records = state.records
    position = model.config.vision_feature_layer % (len(records) + 1)  # 0: the embeddings, j: layer j - 1's output
    out["feature_tokens"] = records[position].tokens_in if position < len(records) else state.final_tokens
    return out

