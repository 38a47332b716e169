"""Prefill and decoding speed of the vision-language reducers on LLaVA-1.5's architecture: `--suite vlm`.

One `LlavaForConditionalGeneration` with random weights (the speed does not depend on them) in
LLaVA-1.5-7B's layout: CLIP ViT-L/14-336 read at layer -2 (576 patch tokens; the CLS dropped), the
mlp2x_gelu projector and the 7B's Llama width with fewer decoder layers (`--lm-layers`). One prompt
(8 text tokens, the image's placeholders, 24 text tokens, as LLaVA's template) is run, in the same
interleaved rounds for every case: the prefill (one forward with the cache: the time to the first
token) and greedy decode steps continuing the prefill's cache. The cases are the unreduced model
and each method at the same visual-token counts (64, 128, 192 of 576), their settings found by
`tokenreduce.match_visual_tokens` on a narrow model of the same depths and token counts (the
counts do not depend on the widths; the timed model's own counts are the ones reported), and
PruMerge and PruMerge+ with their adaptive counts. Peak memory is read in a fresh process per
case that builds the same model (`harness.peak_of_call`).
"""

from __future__ import annotations

import functools
import gc
import itertools
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import tokenreduce
from tokenreduce.bench.harness import (
    Case,
    check_timing_settings,
    in_fresh_process,
    peak_of_call,
    ratio_text,
    spread_too_wide,
)
from tokenreduce.cost import match_visual_tokens
from tokenreduce.engine.speed import (
    DTYPES,
    NOISY,
    SPREAD_LIMIT,
    Load,
    interleaved_setup_times,
    load_average,
    release_free_heap,
    spread,
)
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import create_reducer

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf, config.json): CLIP ViT-L/14-336's vision model, and the
# Vicuna-7B (Llama) language model's width; its depth is --lm-layers (the 7B's 32 by FULL_DEPTH)
CLIP_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 336, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5, "projection_dim": 768}
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32064, "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 4096,
            "pad_token_id": 32001}
LLAVA = {"image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
         "vision_feature_select_strategy": "default", "multimodal_projector_bias": True}
FULL_DEPTH = 32  # LLaVA-1.5-7B's decoder layers; the papers' layer settings are for this depth
# the same layout at a size that runs in milliseconds (tests, smoke runs): 12x12 patches, one tower
# layer after the feature layer (PruMerge's signals), the same vocabulary and special tokens
TINY_VISION = {**CLIP_L14_336, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 6,
               "num_attention_heads": 4, "image_size": 48, "patch_size": 4, "projection_dim": 48}
TINY_TEXT = {**LLAMA_7B, "hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 4,
             "num_key_value_heads": 4}
LLAVA15 = "llava15"
MODELS = {LLAVA15: (CLIP_L14_336, LLAMA_7B), "tiny": (TINY_VISION, TINY_TEXT)}
# the narrow twin the settings are matched on: every depth and token count of the timed model's, the
# widths and the vocabulary small (the counts depend on neither)
TWIN_VISION = {"hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 2, "projection_dim": 32}
TWIN_TEXT = {"hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
             "vocab_size": 64, "pad_token_id": 0}
TWIN_LLAVA = {"image_token_index": 63}

TEXT_BEFORE, TEXT_AFTER = 8, 24  # "<s> USER: " before the image's placeholders, the question and "ASSISTANT:" after
LM_LAYERS = 8
LEAST_LM_LAYERS = 5  # SparseVLM's four pruning layers need [0, depth - 2] to hold four distinct layers
NEW_TOKENS = 16
ROUNDS = 3
PAPER_TOKENS = (64, 128, 192)  # the papers' visual tokens kept of LLaVA-1.5's 576
PAPER_PATCHES = 576
NONE = "none"  # the model as transformers runs it: no patch, no hooks
SEED = 0

# the language-model reducers' layers on the 7B's 32 layers: FastV's and DART's K=2 are kept (an early
# layer: the papers' point), the stage layers are scaled to the depth (`scaled_layers`)
FASTV_LAYER = DART_LAYER = 2
PYRAMIDDROP_LAYERS = (8, 16, 24)
SPARSEVLM_LAYERS = (2, 6, 15, 19)
MATCHED = ("fastv", "pyramiddrop", "dart", "sparsevlm", "visionzip", "pitome")
ADAPTIVE = ("prumerge", "prumerge+")  # their counts adapt to each image: run once each, the count measured
TOLERANCE = 0.02  # of the tokens asked for; DART's counts step by its pivots (`match_tolerance`)


def llava_config(model_name: str, lm_layers: int, twin: bool = False):
    """The LlavaConfig of `model_name` with `lm_layers` decoder layers; `twin`: the narrow model the
    settings are matched on (every depth and token count the same, the widths small)."""
    import transformers  # only this suite needs it

    vision, text = MODELS[model_name]
    if twin:
        vision, text = {**vision, **TWIN_VISION}, {**text, **TWIN_TEXT}
    return transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**vision),
                                    text_config=transformers.LlamaConfig(**text, num_hidden_layers=lm_layers),
                                    **{**LLAVA, **TWIN_LLAVA} if twin else LLAVA)


def image_patches(model_name: str) -> int:
    vision = MODELS[model_name][0]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def default_tokens(model_name: str) -> list[int]:
    """The papers' 64, 128 and 192 of 576 visual tokens, scaled to the model's patches (the same for
    llava15)."""
    patches = image_patches(model_name)
    return [max(1, round(t * patches / PAPER_PATCHES)) for t in PAPER_TOKENS]


def scaled_layers(layers, lm_layers: int, low: int, high: int) -> list[int]:
    """The 7B's layer indices scaled to `lm_layers` (rounded half up), kept strictly increasing within
    [low, high]: PyramidDrop's 8/16/24 of 32 are 2/4/6 of 8."""
    scaled, previous = [], low - 1
    for layer in layers:
        previous = max(previous + 1, low, int(layer * lm_layers / FULL_DEPTH + 0.5))
        scaled.append(previous)
    if scaled[-1] > high:
        raise ConfigError(f"--lm-layers={lm_layers} is too few for the layers {list(layers)} of {FULL_DEPTH}; "
                          f"allowed: an integer from {LEAST_LM_LAYERS} to {FULL_DEPTH}")
    return scaled


def lm_reducer_layers(lm_layers: int) -> dict[str, list[int]]:
    """Each language-model reducer's layers at this depth."""
    return {"fastv": [FASTV_LAYER], "dart": [DART_LAYER],
            "pyramiddrop": scaled_layers(PYRAMIDDROP_LAYERS, lm_layers, 1, lm_layers - 1),
            "sparsevlm": scaled_layers(SPARSEVLM_LAYERS, lm_layers, 0, lm_layers - 2)}


def check_settings(model_name: str, lm_layers: int, tokens, batch: int, new_tokens: int, dtype: str, device: str,
                   rounds: int) -> None:
    """A ConfigError naming the option and what is allowed, before any model is built; `tokens` None:
    `default_tokens`."""
    if model_name not in MODELS:
        raise ConfigError(f"--model={model_name!r} is invalid for the vlm suite; allowed: {', '.join(MODELS)}")
    tokens = default_tokens(model_name) if tokens is None else tokens
    if isinstance(lm_layers, bool) or not isinstance(lm_layers, int) or not LEAST_LM_LAYERS <= lm_layers <= FULL_DEPTH:
        raise ConfigError(f"--lm-layers={lm_layers!r} is invalid; allowed: an integer from {LEAST_LM_LAYERS} (SparseVLM's "
                          f"four pruning layers) to {FULL_DEPTH} (LLaVA-1.5-7B's depth)")
    patches = image_patches(model_name)
    for count in tokens:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count < patches:
            raise ConfigError(f"--tokens={count!r} is invalid; allowed: integers from 1 to {patches - 1} (visual tokens "
                              f"kept of the {patches} patches of --model={model_name})")
    for option, value in (("--batch", batch), ("--new-tokens", new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option}={value!r} is invalid; allowed: an integer >= 1")
    check_timing_settings(dtype, device, rounds)


# --- the model and its prompt ---------------------------------------------------------------------------
def build_llava(model_name: str, lm_layers: int, dtype: torch.dtype, device: str, twin: bool = False) -> nn.Module:
    """The model with seeded random weights, built on `device` in `dtype` (no float32 copy first)."""
    import transformers

    torch.manual_seed(SEED)
    config = llava_config(model_name, lm_layers, twin)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                                         attn_implementation="sdpa")
    return model.eval()


def prompt(model: nn.Module, batch: int) -> dict:
    """LLaVA's one-image prompt: TEXT_BEFORE text tokens, the image's placeholders, TEXT_AFTER text
    tokens (seeded random ids of the text vocabulary), and a seeded random image per sample."""
    config, param = model.config, next(model.parameters())
    generator = torch.Generator().manual_seed(SEED)
    text = torch.randint(1, config.image_token_id, (batch, TEXT_BEFORE + TEXT_AFTER), generator=generator)
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    image = torch.full((batch, patches), config.image_token_id)
    ids = torch.cat([text[:, :TEXT_BEFORE], image, text[:, TEXT_BEFORE:]], dim=1)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, config.vision_config.num_channels, size, size, generator=generator)
    return {"input_ids": ids.to(param.device), "attention_mask": torch.ones_like(ids, device=param.device),
            "pixel_values": pixels.to(device=param.device, dtype=param.dtype)}


def kv_bytes(cache) -> int:
    """Bytes of a DynamicCache's key and value tensors (every layer's: fewer entries after a drop)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class Generation:
    """The prompt's prefill and greedy decode steps on one model, as the timed calls: `prefill()` is
    one forward of the prompt with the cache (the first token's logits only, as `generate` computes
    them), `decode(cache, token)` `steps` greedy steps continuing that cache (the image placeholder
    is never chosen: the random weights could pick it)."""

    def __init__(self, model: nn.Module, inputs: dict, steps: int):
        self.model, self.inputs, self.steps = model, inputs, steps
        ids = inputs["input_ids"]
        self.image_token = model.config.image_token_id
        # generate's decode masks and positions: the prompt's length plus the tokens since, the prompt's
        # numbering (a reduced model shortens and renumbers its own)
        self.masks = torch.ones(ids.shape[0], ids.shape[1] + steps, dtype=inputs["attention_mask"].dtype,
                                device=ids.device)
        self.positions = torch.arange(ids.shape[1], ids.shape[1] + steps, device=ids.device).expand(ids.shape[0], -1)

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1].clone()
        last[:, self.image_token] = -torch.inf
        return last.argmax(dim=-1, keepdim=True)

    def prefill(self):
        """The cache the prompt filled and the first token."""
        out = self.model(**self.inputs, use_cache=True, logits_to_keep=1)
        return out.cache, self.next_token(out.logits)

    def decode(self, cache, token: torch.Tensor) -> torch.Tensor:
        """`steps` new tokens after `token`, continuing `cache` (which grows)."""
        width = self.inputs["input_ids"].shape[1]
        tokens = []
        for step in range(self.steps):
            out = self.model(input_ids=token, cache=cache, attention_mask=self.masks[:, : width + step + 1],
                             position_ids=self.positions[:, step:step + 1], use_cache=True)
            token = self.next_token(out.logits)
            tokens.append(token)
        return torch.cat(tokens, dim=1)


# --- the cases ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A case before its setting is found: `reducer` keeping `tokens` visual tokens per image with
    `fixed` parameters (None: the unreduced model, or an adaptive count)."""

    label: str
    reducer: str
    tokens: int | None = None
    fixed: dict = field(default_factory=dict)


def visionzip_contextual(tokens: int) -> int:
    """VisionZip's split of the paper: 54+10, 108+20, 162+30 contextual for 64, 128, 192."""
    return max(1, round(tokens * 10 / 64))


def plans(lm_layers: int, tokens, patches: int = PAPER_PATCHES) -> list[Plan]:
    """The unreduced model, each matched method at each count (methods in MATCHED's order, counts
    ascending), then PruMerge and PruMerge+ once each. `patches`: the image's tokens.

    SparseVLM's count adapts to the rank of its raters' attention (which random weights make
    meaningless, and which differs between the twin and the timed model); with `scale=0,
    bias=patches` the rank rule keeps everything and its cap `keep`, the strength searched, sets the
    count (its recycled clusters come on top, as the measure counts them)."""
    layers = lm_reducer_layers(lm_layers)
    fixed = {"fastv": {"layer": FASTV_LAYER}, "pyramiddrop": {"layers": layers["pyramiddrop"]},
             "dart": {"layer": DART_LAYER}, "pitome": {},
             "sparsevlm": {"layers": layers["sparsevlm"], "scale": 0.0, "bias": patches}}
    out = [Plan("unreduced", NONE)]
    for name in MATCHED:
        for count in sorted(set(tokens)):
            given = {"contextual": visionzip_contextual(count)} if name == "visionzip" else fixed[name]
            out.append(Plan(f"{name} {count}", name, count, given))
    return out + [Plan(f"{name} (adaptive)", name) for name in ADAPTIVE]


def match_tolerance(plan: Plan) -> float:
    """DART keeps `image_pivots + pivots * (budget // pivots)` image tokens: with its 4 + 4 pivots the
    closest to 64 are 60 and 68, so it may miss by half its pivots."""
    if plan.reducer != "dart":
        return TOLERANCE
    reducer = create_reducer("dart", **plan.fixed)
    return max(TOLERANCE, (reducer.image_pivots + reducer.text_pivots) / 2 / plan.tokens)


def matched_cases(twin: nn.Module, planned: list[Plan]) -> list[tuple[Case, float | None]]:
    """Each plan's case, its setting found on `twin` (`match_visual_tokens`, measure "final": the
    visual tokens through the language model's last layer), and the count reached there (None for the
    unreduced model and the adaptive ones)."""
    out = []
    for plan in planned:
        if plan.tokens is None:
            out.append((Case(plan.label, plan.reducer, dict(plan.fixed)), None))
            continue
        params, reached = match_visual_tokens(twin, plan.reducer, plan.tokens, tolerance=match_tolerance(plan),
                                              **plan.fixed)
        out.append((Case(plan.label, plan.reducer, params), reached))
    return out


def default_cases(model_name: str, lm_layers: int = LM_LAYERS, tokens=None) -> list[tuple[Case, float | None]]:
    """The cases with their settings, matched on the narrow twin of `model_name`, and the counts reached."""
    twin = build_llava(model_name, lm_layers, torch.float32, "cpu", twin=True)
    return matched_cases(twin, plans(lm_layers, tokens or default_tokens(model_name), image_patches(model_name)))


# --- timing ---------------------------------------------------------------------------------------------
def place(model: nn.Module, case: Case, reducer=None) -> None:
    """Put `case` on the model: the unreduced one unpatched, a reducer (`reducer`: the instance kept
    across rounds) by `tokenreduce.apply`."""
    if case.reducer == NONE:
        tokenreduce.remove(model)
    else:
        tokenreduce.apply(model, reducer if reducer is not None else case.reducer,
                          **({} if reducer is not None else case.params))


@dataclass
class Measured:
    """What a case's first prefill (its warm-up) says: `stats` (None for the unreduced model, which runs
    unpatched) and the KV cache's bytes."""

    stats: dict | None = None
    kv_bytes: int | None = None


class Timed:
    """The one callable the interleaved rounds time: the current case's prefill or decode steps
    (`mode`, set by each timer's setup). A decode timer continues the cache of its case's prefill,
    which runs just before it (a reduced cache is continued only under the patch that filled it, so
    the case is not placed again in between); without one it makes one outside the clock."""

    def __init__(self, generation: Generation, cases: list[Case], reducers: list):
        self.generation, self.cases, self.reducers = generation, cases, reducers
        self.case, self.mode, self.placed = 0, "prefill", None
        self.pending = None  # (case, cache, first token) of the last prefill, for its decode steps
        self.measured = [Measured() for _ in cases]

    def setup(self, case: int, mode: str) -> None:
        if self.placed != case:
            self.pending = None
            place(self.generation.model, self.cases[case], self.reducers[case])
            self.placed = case
        self.case, self.mode = case, mode
        if mode == "decode" and (self.pending is None or self.pending[0] != case):
            self.pending = None
            self.pending = (case, *self.generation.prefill())

    def __call__(self, ids: torch.Tensor):
        if self.mode == "decode":
            _, cache, token = self.pending
            self.pending = None
            return self.generation.decode(cache, token)
        self.pending = None  # its cache is freed before the next one is filled
        cache, token = self.generation.prefill()
        measured = self.measured[self.case]
        if measured.kv_bytes is None:  # the case's warm-up prefill
            measured.kv_bytes = kv_bytes(cache)
            model = self.generation.model
            measured.stats = tokenreduce.stats(model) if tokenreduce.reducer_of(model) is not None else None
        self.pending = (self.case, cache, token)
        return token

    def finish(self) -> None:
        """Drop the last cache and leave the model unpatched."""
        self.pending = None
        place(self.generation.model, self.cases[0])
        self.placed = None


def unreduced_stats(generation: Generation) -> dict:
    """`stats` of the unreduced prefill (the "none" reducer counts without changing anything)."""
    model = generation.model
    tokenreduce.apply(model, NONE)
    try:
        with torch.inference_mode():
            generation.prefill()
        return tokenreduce.stats(model)
    finally:
        tokenreduce.remove(model)


def time_cases(model: nn.Module, inputs: dict, cases: list[Case], rounds: int, new_tokens: int
               ) -> tuple[list[list[float]], list[list[float]], list[Measured]]:
    """Seconds of each case's prefill and of its `new_tokens` decode steps, in the same interleaved
    rounds after one warm-up call each (every case's prefill then its decode steps, case after case),
    and what each case's warm-up prefill measured (`Measured`; the unreduced model's stats from a
    "none" pass). The model is left unpatched."""
    if not cases or cases[0].reducer != NONE:
        raise ConfigError(f"cases: the first must be the unreduced model ({NONE!r}); got {cases[:1]!r}")
    generation = Generation(model, inputs, new_tokens)
    base_stats = unreduced_stats(generation)
    reducers = [create_reducer(c.reducer, **c.params) if c.reducer != NONE else None for c in cases]
    timed = Timed(generation, cases, reducers)
    setups = [functools.partial(timed.setup, i, mode) for i in range(len(cases)) for mode in ("prefill", "decode")]
    calls = itertools.count(1)
    started = time.perf_counter()

    def progress():  # at the real size a prefill takes seconds on a CPU: say how far the rounds are
        print(f"  call {next(calls)} of {len(setups) * (rounds + 1)}, {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)

    try:
        with torch.inference_mode():
            seconds = interleaved_setup_times(timed, setups, inputs["input_ids"], warmup=1, rounds=rounds,
                                              on_timing=progress)
    finally:
        timed.finish()
    timed.measured[0].stats = base_stats
    return seconds[0::2], seconds[1::2], timed.measured


def peak_memory_mb(model_name: str, lm_layers: int, case: Case, batch: int, dtype: str, device: str) -> float:
    """Peak memory of the prefill (its KV cache included) in a fresh process that builds the same
    model; on either device the memory the call adds to what the weights and inputs hold."""
    return in_fresh_process("tokenreduce.bench.vlm", "_peak_child", model_name, lm_layers, case.reducer,
                            case.params, batch, dtype, device)


def _peak_child(model_name, lm_layers, reducer, params, batch, dtype, device) -> float:
    model = build_llava(model_name, lm_layers, DTYPES[dtype], device)
    generation = Generation(model, prompt(model, batch), 1)
    place(model, Case("", reducer, params))
    return peak_of_call(generation.prefill, generation.prefill, device, above_start=True)


def run(model_name: str = LLAVA15, lm_layers: int = LM_LAYERS, tokens=None, batch: int = 1, dtype: str = "float32",
        device: str = "cpu", rounds: int = ROUNDS, new_tokens: int = NEW_TOKENS, memory: bool = True,
        cases: list[tuple[Case, float | None]] | None = None) -> list[dict]:
    """Match the settings (`default_cases`), time every case against the unreduced model in the same
    interleaved rounds, then read each one's peak memory; one row per case (`summarise`), with the
    settings."""
    tokens = list(tokens or default_tokens(model_name))
    check_settings(model_name, lm_layers, tokens, batch, new_tokens, dtype, device, rounds)
    cases = cases or default_cases(model_name, lm_layers, tokens)
    before = load_average()
    model = build_llava(model_name, lm_layers, DTYPES[dtype], device)
    described = describe(model)
    prefill, decode, measured = time_cases(model, prompt(model, batch), [c for c, _ in cases], rounds, new_tokens)
    load = Load.since(before)
    del model  # the memory processes build their own: never two at once
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    else:
        release_free_heap()
    peaks = [peak_memory_mb(model_name, lm_layers, c, batch, dtype, device) if memory else None for c, _ in cases]
    settings = {"suite": "vlm", "model": model_name, "described": described, "lm_layers": lm_layers,
                "lm_reducer_layers": lm_reducer_layers(lm_layers), "batch": batch, "new_tokens": new_tokens,
                "dtype": dtype, "device": device, "rounds": rounds, **load.as_record()}
    rows = summarise([c for c, _ in cases], prefill, decode, new_tokens, measured, peaks)
    return [{**settings, **row, "matched": reached} for row, (_, reached) in zip(rows, cases, strict=True)]


def describe(model: nn.Module) -> str:
    """The timed model's layout in words."""
    vision, text = model.config.vision_config, model.config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2
    projector = model.model.multi_modal_projector
    return (f"CLIP tower {vision.num_hidden_layers} layers x {vision.hidden_size} (MLP {vision.intermediate_size}, "
            f"{vision.num_attention_heads} heads, {vision.hidden_act}), image {vision.image_size} in patches of "
            f"{vision.patch_size}: {patches} + CLS, read at layer {model.config.vision_feature_layer}; projector "
            f"{projector.linear_1.in_features} -> {projector.linear_1.out_features} -> "
            f"{projector.linear_2.out_features}; Llama {text.num_hidden_layers} layers x {text.hidden_size} (MLP "
            f"{text.intermediate_size}, {text.num_attention_heads} heads, {text.num_key_value_heads} kv heads, "
            f"vocabulary {text.vocab_size})")


# --- the table ------------------------------------------------------------------------------------------
def summarise(cases: list[Case], prefill: list[list[float]], decode: list[list[float]], new_tokens: int,
              measured: list[Measured], peaks: list[float | None]) -> list[dict]:
    """One row per case from its seconds per prefill and per `new_tokens` decode steps, what its
    warm-up prefill measured and its peak memory (None where not measured); the first case is the
    unreduced model.

    prefill_s: median seconds of the prefill; decode_ms: median milliseconds per decoded token;
    speed-ups: the unreduced median over the case's; gmacs, mac_fraction: the prefill's MACs (stats'
    macs: tower, projector, decoder layers, signals) and over the unreduced; visual_tokens: per image
    through the last decoder layer, visual_mean: their mean over the layers; kv_mb: the cache after
    the prefill; memory: peak over the unreduced peak."""
    medians = [sorted(s)[len(s) // 2] for s in prefill]
    per_token = [[t / new_tokens for t in s] for s in decode]
    decode_medians = [sorted(s)[len(s) // 2] for s in per_token]
    base = measured[0]
    rows = []
    for case, spent, median, steps, step_median, seen, peak in zip(
            cases, prefill, medians, per_token, decode_medians, measured, peaks, strict=True):
        stats = seen.stats or {}
        visual = stats.get("visual_tokens")
        macs = stats.get("macs")
        rows.append({
            "case": case.label, "reducer": case.reducer, "params": case.params,
            "visual_tokens": visual[-1] if visual else None,
            "visual_mean": sum(visual) / len(visual) if visual else None,
            "prefill_s": median, "prefill_per_round": spent, "prefill_spread": spread(spent),
            "prefill_speedup": medians[0] / median,
            "decode_ms": 1000 * step_median, "decode_per_round": steps, "decode_spread": spread(steps),
            "decode_speedup": decode_medians[0] / step_median,
            "gmacs": macs / 1e9 if macs is not None else None,
            "mac_fraction": macs / base.stats["macs"] if macs is not None and base.stats else None,
            "decode_gmacs": stats["decode_macs"] / 1e9 if "decode_macs" in stats else None,
            "kv_mb": seen.kv_bytes / 2**20 if seen.kv_bytes is not None else None,
            "peak_mb": peak,
            "memory": peak / peaks[0] if peak is not None and peaks[0] else None,
        })
    return rows


LAYERS_KEYS = {"layer", "layers"}  # said in the header, not in every row


def setting_text(params: dict) -> str:
    """A case's parameters as a table cell, its layers left out (the header says them)."""
    shown = {k: v for k, v in params.items() if k not in LAYERS_KEYS}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "-"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


UNMATCHED = "*"  # the timed model's count differs from the one its setting reached on the narrow twin


def _unmatched(row: dict) -> bool:
    return row.get("matched") is not None and row["visual_tokens"] != row["matched"]


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table; a timing whose rounds disagree is marked, and a count that is not
    the one matched."""
    head = ["case", "setting", "visual tokens", "mean", "prefill s", "prefill speed-up", "decode ms/token",
            "decode speed-up", "GMACs", "MACs", "KV MB", "peak MB", "memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        cells = [r["case"], setting_text(r["params"]),
                 _count(r["visual_tokens"]) + (UNMATCHED if _unmatched(r) else ""), _count(r["visual_mean"]),
                 f"{r['prefill_s']:.3f}{NOISY if spread_too_wide(r['prefill_spread']) else ''}",
                 ratio_text(r["prefill_speedup"]),
                 f"{r['decode_ms']:.1f}{NOISY if spread_too_wide(r['decode_spread']) else ''}",
                 ratio_text(r["decode_speedup"]), "-" if r["gmacs"] is None else f"{r['gmacs']:.1f}",
                 ratio_text(r["mac_fraction"], 3, ""), "-" if r["kv_mb"] is None else f"{r['kv_mb']:.1f}",
                 "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}", ratio_text(r["memory"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict]) -> str:
    """The table with its settings above it and the protocol below it."""
    first = rows[0]
    load = Load(first["load_before"], first["load_after"], first["cores"], first["threads"])
    layers = first["lm_reducer_layers"]
    noisy = any(spread_too_wide(r["prefill_spread"]) or spread_too_wide(r["decode_spread"]) for r in rows)
    lines = [
        f"vlm: LlavaForConditionalGeneration --model {first['model']} (random weights), {first['lm_layers']} decoder "
        f"layers (LLaVA-1.5-7B has {FULL_DEPTH}): {first['described']}",
        f"prompt: {TEXT_BEFORE} text tokens, the image's placeholders, {TEXT_AFTER} text tokens; batch "
        f"{first['batch']}, {first['new_tokens']} new tokens; device={first['device']} dtype={first['dtype']} "
        f"threads={first['threads']} rounds={first['rounds']}; {load.words()}",
        f"layers of the language-model reducers: fastv K={layers['fastv'][0]}, dart K={layers['dart'][0]}, "
        f"pyramiddrop {layers['pyramiddrop']}, sparsevlm {layers['sparsevlm']}",
        "",
        format_table(rows),
        "",
        "prefill: median seconds of one forward of the prompt with the cache (the time to the first token); decode: "
        "median milliseconds per greedy token continuing the prefill's cache; speed-ups against the unreduced model; "
        "visual tokens: per image through the last decoder layer (the count matched: match_visual_tokens, measure "
        "'final', on a narrow model of the same depths), mean: over the decoder layers; GMACs: one sample's prefill "
        "(tower, projector, decoder layers, signals), MACs: its fraction of the unreduced; KV: the cache's keys and "
        "values after the prefill; peak: the prefill's peak memory above weights and inputs, in a fresh process; "
        "memory: against the unreduced"
        + (f"; {NOISY} rounds over {SPREAD_LIMIT:.0%} apart" if noisy else "")
        + (f"; {UNMATCHED} not the count the setting reached on the narrow model" if any(map(_unmatched, rows))
           else ""),
    ]
    return "\n".join(lines)
