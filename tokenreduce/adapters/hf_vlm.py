"""Dropping visual tokens inside the language model of a Hugging Face `transformers` vision-language
model during the prefill: `LlavaForConditionalGeneration` (the LLaVA-1.5 layout: a CLIP tower, a
projector, a Llama language model). The reducers are FastV, PyramidDrop and DART
(`tokenreduce.reducers.vlm`); see docs/vlm.md.

The model runs its own forward and its own layers. The placement is forward pre-hooks on the
language model's decoder layers, and a wrapper of the model's `forward` and `generate`:
- the wrapper finds the image tokens (the placeholder id) and each sample's anchor (its last prompt
  token; under `generate` the last token of the prompt it was given, so a pass without the KV cache,
  which runs the prompt again with every new token, selects as the cached prefill did), and opens a
  per-pass object that the hooks read;
- at a stage layer the hook computes the reducer's signals (the anchor's attention row recomputed
  from the layer's q/k projections, rotary embedding and mask row, as eager attention would give it:
  sdpa returns no weights; or the layer's keys; or the previous layer's output through the final
  norm), asks the reducer which positions stay and gathers the hidden states, the rotary (cos, sin),
  the position ids and the 4-D mask's rows and columns; every later layer gets the shortened ones.
  Kept positions are tracked in the prompt's numbering, so stages compose and positions are not
  renumbered (FastV);
- the KV cache of layers from the first stage on holds fewer entries than layer 0's. Decode steps
  keep the full numbering of positions (generate builds them from the 2-D mask) and get a mask of
  the full length plus the new tokens; the hook gathers, at each reduced layer, the mask's columns
  of the kept prompt positions and of the new tokens, so padding stays masked. What the prefill
  kept is stored per cache object (weakly), so any cache a reduced prefill filled can be continued.

Refused before any compute, with the reason: beams and num_return_sequences > 1, chunked prefill,
static/offloaded/quantized caches and caches with sliding-window layers, a non-empty cache not
filled by a reduced prefill, assisted decoding, attention other than eager/sdpa, labels (the logits
are those of the kept positions), per-layer outputs, inputs_embeds without input_ids, and batches
whose samples hold different numbers of image tokens.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import register_adapter
from tokenreduce.adapters.hf_common import (
    HFAdapterBase,
    bind,
    check_attention_implementation,
    from_transformers,
    import_transformers,
    modeling,
    refuse_outputs,
)
from tokenreduce.core.contract import Patch
from tokenreduce.core.macs import linear_macs
from tokenreduce.core.state import LayerRecord, ReductionState
from tokenreduce.core.vlm import (
    ANCHOR_ATTN,
    LAYER_KEYS,
    NORMED_OUTPUT,
    LanguageModelInfo,
    PrefillView,
    is_prefill_reducer,
)
from tokenreduce.errors import ConfigError, UnsupportedModelError

SUPPORTED = ("LlavaForConditionalGeneration",)
REDUCERS = ("fastv", "pyramiddrop", "dart", "none")


def _claimed_class(cls: type) -> type | None:
    if not from_transformers(cls):
        return None
    llava = modeling("llava")
    return llava.LlavaForConditionalGeneration if issubclass(cls, llava.LlavaForConditionalGeneration) else None


def language_model(model: nn.Module) -> nn.Module:
    return model.model.language_model


def describe(model: nn.Module) -> LanguageModelInfo:
    name = type(model).__name__
    lm = language_model(model)
    llama = modeling("llama")
    if type(lm) is not llama.LlamaModel:
        raise UnsupportedModelError(f"model {name} has a {type(lm).__name__} language model; supported: LlamaModel "
                                    "(the LLaVA-1.5 layout)")
    bad = [i for i, layer in enumerate(lm.layers) if type(layer) is not llama.LlamaDecoderLayer
           or type(layer.self_attn) is not llama.LlamaAttention]
    if bad:
        raise UnsupportedModelError(f"model {name} has replaced decoder layers or attention at layers {bad}; "
                                    "supported: transformers' LlamaDecoderLayer with LlamaAttention")
    check_attention_implementation(name, lm.config, why="the kept tokens' 4-D mask is gathered, which these take")
    config = lm.config
    head_dim = lm.layers[0].self_attn.head_dim
    return LanguageModelInfo(name=name, depth=len(lm.layers), num_prefix=0, has_class_token=False,
                             embed_dim=config.hidden_size, num_heads=config.num_attention_heads,
                             image_token_id=int(model.config.image_token_id), num_kv_heads=config.num_key_value_heads,
                             head_dim=head_dim)


# --- the per-pass objects ---------------------------------------------------------------------------
@dataclass
class Prefill:
    """One prefill pass in flight: the sequence as it is at the current layer, in the prompt's
    numbering (`kept`), and what the pass did, layer by layer."""

    reducer: object
    stages: list
    counts: list[int]
    image_mask: Tensor  # [B, N] of the current sequence
    anchor: Tensor  # [B] current position of each sample's anchor
    prompt: Tensor  # [B, N] the prompt's real tokens (not padding, not generated)
    kept: Tensor  # [B, N] the current positions' indices in the full sequence
    num_visual: int
    stage_inputs: dict = field(default_factory=dict)  # stage index -> (hidden, kwargs) at its signal layer
    replaced: dict | None = None  # the shortened layer arguments, once a stage dropped tokens
    entering: list[int] = field(default_factory=list)  # per layer: sequence tokens before its drop (per sample)
    tokens: list[int] = field(default_factory=list)  # per layer: sequence tokens through it (per sample)
    visual: list[int] = field(default_factory=list)  # per layer: image tokens through it
    kept_at: list = field(default_factory=list)  # per layer: kept full-sequence indices, None: all
    reducer_macs: int = 0


@dataclass
class Decode:
    """One pass that continues a reduced prefill's cache: per layer the prefill's kept indices."""

    kept_at: list


@dataclass
class VLMPatch(Patch):
    """The Patch of a vision-language model: the hooks on its decoder layers, the pass in flight and
    the prompt length of the `generate` call in flight (per thread), and per cache filled by a
    reduced prefill the kept indices of each layer."""

    handles: list = field(default_factory=list, repr=False)
    local: threading.local = field(default_factory=threading.local, repr=False)
    caches: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

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


def anchor_attention(layer: nn.Module, hidden: Tensor, mask: Tensor | None, cos: Tensor, sin: Tensor,
                     anchor: Tensor) -> Tensor:
    """The anchor token's attention probabilities [B, H, 1, N] in `layer`, as eager attention computes
    them: softmax(q_a k^T * scaling + mask row) in float32, q_a and k after the rotary embedding,
    the keys repeated over each key-value head's query heads."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, n, _ = x.shape
    cos, sin = _per_sample(cos, b), _per_sample(sin, b)
    pick = anchor.view(b, 1)
    xa = _gather_tokens(x, pick)
    q = attn.q_proj(xa).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    q = _rotary(q, _gather_tokens(cos, pick), _gather_tokens(sin, pick))
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
    k = modeling("llama").repeat_kv(_rotary(k, cos, sin), attn.num_key_value_groups)
    logits = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # [B, H, 1, N]
    if mask is None:  # sdpa without padding: causal
        row = torch.arange(n, device=x.device).view(1, 1, 1, n) <= anchor.view(b, 1, 1, 1)
    else:
        mask = _per_sample(mask, b)
        row = mask.gather(2, anchor.view(b, 1, 1, 1).expand(b, mask.shape[1], 1, mask.shape[-1]))
    if row.dtype == torch.bool:
        logits = logits.masked_fill(~row, torch.finfo(logits.dtype).min)
    else:
        logits = logits + row
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


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
        kept = run.kept_at[self.index]
        mask = kwargs.get("attention_mask")
        if kept is None or mask is None:
            return kwargs
        b, q = hidden.shape[:2]
        cached = kwargs["cache"].get_seq_length(self.index)
        new = cached + q - kept.shape[1]  # the decode tokens this layer's cache holds after this step
        full = mask.shape[-1]
        columns = torch.cat([kept, torch.arange(full - new, full, device=kept.device).expand(b, new)], dim=1)
        mask = _per_sample(mask, b)
        kwargs["attention_mask"] = mask.gather(3, columns.view(b, 1, 1, -1).expand(b, mask.shape[1], mask.shape[2], -1))
        return kwargs

    def prefill(self, run: Prefill, layer: nn.Module, hidden: Tensor, kwargs: dict) -> tuple[Tensor, dict]:
        if run.replaced is not None:
            kwargs.update(run.replaced)
        for s, stage in enumerate(run.stages):
            if stage.signal_layer == self.index and stage.layer > self.index:
                run.stage_inputs[s] = (hidden, dict(kwargs))
        run.entering.append(hidden.shape[1])
        for s, stage in enumerate(run.stages):
            if stage.layer == self.index:
                hidden, kwargs = self.drop(run, s, stage, hidden, kwargs)
        run.tokens.append(hidden.shape[1])
        run.visual.append(int(run.image_mask[0].sum()) if run.image_mask.shape[0] else 0)
        run.kept_at.append(None if run.replaced is None else run.kept)
        return hidden, kwargs

    def drop(self, run: Prefill, s: int, stage, hidden: Tensor, kwargs: dict) -> tuple[Tensor, dict]:
        source_hidden, source_kwargs = run.stage_inputs.pop(s, (hidden, kwargs))
        source = self.lm.layers[stage.signal_layer]
        cos, sin = source_kwargs["position_embeddings"]
        n = hidden.shape[1]
        view = PrefillView(image_mask=run.image_mask, anchor=run.anchor, prompt=run.prompt)
        attn = source.self_attn
        k_macs = linear_macs(attn.k_proj)
        if ANCHOR_ATTN in stage.needs:
            view.anchor_attn = anchor_attention(source, source_hidden, source_kwargs.get("attention_mask"), cos, sin,
                                                run.anchor)
            run.reducer_macs += n * k_macs + linear_macs(attn.q_proj) + n * attn.q_proj.out_features
        if LAYER_KEYS in stage.needs:
            view.layer_keys = layer_keys(source, source_hidden, cos, sin)
            run.reducer_macs += n * k_macs
        if NORMED_OUTPUT in stage.needs:
            view.normed_output = self.lm.norm(hidden)
        index = run.reducer.select(s, view, run.counts[s])  # [B, M] ascending positions of the current sequence
        run.image_mask = run.image_mask.gather(1, index)
        run.prompt = run.prompt.gather(1, index)
        run.anchor = (index < run.anchor.unsqueeze(1)).sum(dim=1)  # the anchor is text: always kept
        run.kept = run.kept.gather(1, index)
        cos, sin = kwargs["position_embeddings"]
        run.replaced = {
            "attention_mask": _gather_mask(kwargs.get("attention_mask"), index),
            "position_embeddings": (_gather_tokens(cos, index), _gather_tokens(sin, index)),
            "position_ids": _gather_tokens(kwargs["position_ids"], index),
        }
        kwargs.update(run.replaced)
        return _gather_tokens(hidden, index), kwargs


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
        if cache is not None and cache.get_seq_length() > 0:
            entry = patch.caches.get(cache)
            if entry is None:
                _refuse("a non-empty cache not filled by a reduced prefill", "its layers hold every token",
                        "an empty cache, or the cache a reduced pass returned")
            if arguments.get("pixel_values") is not None or arguments.get("mm_encoder_outputs"):
                _refuse("images after the prefill", "the image tokens are cut in the prefill only",
                        "pixel_values in the first pass")
            return self._tr_run(original, arguments, extra, entry)
        input_ids = arguments.get("input_ids")
        if input_ids is None:
            _refuse("inputs_embeds without input_ids", "the image tokens are found by their placeholder id",
                    "input_ids")
        info = patch.info
        b, n = input_ids.shape
        prompt = getattr(patch.local, "prompt", None) or n
        image_mask = input_ids == info.image_token_id
        image_mask[:, prompt:] = False
        counts = image_mask.sum(dim=1)
        if b and bool((counts != counts[0]).any()):
            _refuse(f"a batch with {counts.tolist()} image tokens per sample", "every sample keeps the same number, "
                    "so the kept tokens stay one tensor", "the same number of images (and image tokens) in every sample")
        num_visual = int(counts[0]) if b else 0
        reducer = self.token_reducer
        stages = reducer.prefill_stages() if is_prefill_reducer(reducer) and num_visual else []
        if stages:
            reducer.check_visual(num_visual)
        mask2d = arguments.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask2d is None else mask2d.bool()
        position = torch.arange(n, device=input_ids.device)
        anchor = torch.where(valid[:, :prompt], position[:prompt], -1).amax(dim=1) if b else position[:0]
        if b and bool((anchor < 0).any()):
            _refuse("a sample whose prompt is all padding", "it has no last prompt token to rank by",
                    "at least one real token per sample")
        use_cache = extra.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else lm.config.use_cache):
            cache = arguments["cache"] = cache_classes()[0](config=lm.config)
        run = Prefill(reducer=reducer, stages=stages, counts=reducer.visual_counts(num_visual) if stages else [],
                      image_mask=image_mask, anchor=anchor, prompt=valid & (position < prompt), kept=position.expand(b, n),
                      num_visual=num_visual)
        out = self._tr_run(original, arguments, extra, run)
        if cache is not None:
            patch.caches[cache] = Decode(kept_at=run.kept_at)
        patch.last_state = prefill_state(run)
        return out

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
        try:
            return super().generate(*args, **kwargs)
        finally:
            patch.local.prompt = previous


# --- what a pass did -----------------------------------------------------------------------------------
def prefill_state(run: Prefill) -> ReductionState:
    state = ReductionState(num_prefix=0, removals=[])
    state.records = [LayerRecord(tokens_attn=t, tokens_mlp=t, tokens_in=e)
                     for e, t in zip(run.entering, run.tokens, strict=True)]
    state.final_tokens = run.tokens[-1] if run.tokens else 0
    state.extras.update(visual=list(run.visual), kept=run.kept, image_tokens=run.num_visual,
                        reducer_macs=run.reducer_macs)
    return state


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
              "prefill (LlavaForConditionalGeneration with a Llama language model; reducers: "
              + ", ".join(REDUCERS) + ")")
    reduced_methods = ReducedVLM
    claimed_class = staticmethod(_claimed_class)
    model_info = staticmethod(describe)
    model_macs = staticmethod(pass_macs)

    def check_reducer(self, model: nn.Module, reducer, info: LanguageModelInfo, options: dict) -> None:
        if is_prefill_reducer(reducer) or reducer.name == "none":
            return
        raise ConfigError(
            f"reducer {reducer.name!r} cannot run in {info.name}: it reduces the tokens of a vision encoder's blocks, "
            "and this adapter drops visual tokens inside the language model; allowed: "
            + ", ".join(map(repr, REDUCERS)))

    def patch(self, model: nn.Module, reducer, info: LanguageModelInfo, options: dict) -> None:
        patch = VLMPatch(adapter=self, original_class=type(model), info=info, options=options)
        lm = language_model(model)
        patch.handles = [layer.register_forward_pre_hook(LayerHook(patch, lm, i), with_kwargs=True)
                         for i, layer in enumerate(lm.layers)]
        model._tokenreduce = patch
        model.token_reducer = reducer
        model.__class__ = self._reduced_class(type(model))

    def unpatch(self, model: nn.Module) -> None:
        for handle in model._tokenreduce.handles:
            handle.remove()
        super().unpatch(model)

    def pass_stats(self, model: nn.Module, state: ReductionState) -> dict:
        macs = pass_macs(model, state)
        return {"tokens": state.tokens_per_layer(), "removed": [r.tokens_in - r.tokens_attn for r in state.records],
                "visual_tokens": state.extras["visual"], "image_tokens": state.extras["image_tokens"],
                "kept": state.extras["kept"], "macs": macs["total"], "macs_parts": macs, "source": None}

