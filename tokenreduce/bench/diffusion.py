"""Speed and memory of the diffusion reducers on Stable Diffusion 1.5's U-Net: `--suite diffusion`.

One U-Net (random weights: the speed does not depend on them) is called on a guidance batch (2
latents, 77 text tokens) in each case in turn, in the same interleaved rounds as the unreduced
call, per latent size: our `tomesd` and the original tomesd 0.1.3 at the same ratios (one patch
on the U-Net at a time), `todo`, and our mergers `tome`, `pitome` and `tofu` in the
merge-compute-unmerge placement. Peak memory is read in a fresh process per case that builds the
same U-Net from the same config (`harness.peak_of_call`).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import sys
import time

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
from tokenreduce.core.macs import counted_macs
from tokenreduce.engine.speed import (
    DTYPES,
    NOISY,
    SPREAD_LIMIT,
    Load,
    images_per_second,
    interleaved_setup_times,
    load_average,
    spread,
)
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import create_reducer

# Stable Diffusion 1.5's published U-Net config (runwayml/stable-diffusion-v1-5, unet/config.json);
# the keys diffusers would default differently are cross_attention_dim (1280) and sample_size (None)
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# the same layout at a size that runs in milliseconds (tests, smoke runs)
TINY_UNET = {**SD15_UNET, "sample_size": 16, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1,
             "norm_num_groups": 8, "cross_attention_dim": 32}
UNETS = {"sd15": SD15_UNET, "tiny": TINY_UNET}

BATCH = 2  # classifier-free guidance: the conditional and unconditional latents in one call
TEXT_TOKENS = 77  # CLIP's context length
TIMESTEP = 500
LATENTS = (64, 96)  # 512x512 and 768x768 images (the VAE downsamples by 8)
RATIOS = (0.3, 0.5, 0.6)
BIPARTITE_MOST = 0.5  # a bipartite merge pairs each token of one half with one of the other: at most half goes
NONE = "none"  # the U-Net as diffusers runs it: no patch, no hooks
ORIGINAL = "original-tomesd"  # tomesd 0.1.3's own `apply_patch`
# tomesd's README: SD 1.5, 512x512, ratio 0.5, fp16 on an RTX 4090, 50 PLMS steps, seconds per image
PUBLISHED_SPEEDUP = 1.87
PUBLISHED_SETTING = {"unet": "sd15", "latent": 64, "ratio": 0.5}


def default_cases() -> list[Case]:
    """The unreduced call first, then ours and the original tomesd side by side at each ratio, `todo`,
    and the mergers at the same merged fractions up to half (`BIPARTITE_MOST`; tomesd's 0.6 is out of
    their reach): their `ratio` is the fraction kept, so tomesd's ratio r is their 1 - r."""
    cases = [Case("unreduced", NONE)]
    for ratio in RATIOS:
        cases += [Case(f"tomesd ratio={ratio}", "tomesd", {"ratio": ratio}),
                  Case(f"original tomesd ratio={ratio}", ORIGINAL, {"ratio": ratio})]
    cases.append(Case("todo downsample=2", "todo", {"downsample": 2}))
    cases += [Case(f"{name} ratio={round(1 - ratio, 2)}", name, {"ratio": round(1 - ratio, 2)})
              for name in ("tome", "pitome", "tofu") for ratio in RATIOS if ratio <= BIPARTITE_MOST]
    return cases


def original_available() -> bool:
    return importlib.util.find_spec("tomesd") is not None


def downsampling(unet_name: str) -> int:
    """How many times the U-Net halves the latent: each level but the last downsamples."""
    return 2 ** (len(UNETS[unet_name]["block_out_channels"]) - 1)


def check_settings(unet_name: str, latents, dtype: str, device: str, rounds: int) -> None:
    """A ConfigError naming the option and what is allowed, before any model is built."""
    if unet_name not in UNETS:
        raise ConfigError(f"--unet={unet_name!r} is invalid; allowed: {', '.join(UNETS)}")
    factor = downsampling(unet_name)
    for latent in latents:
        if isinstance(latent, bool) or not isinstance(latent, int) or latent < factor or latent % factor:
            raise ConfigError(f"--latents={latent!r} is invalid; allowed: multiples of {factor} (the U-Net halves "
                              f"the latent {factor.bit_length() - 1} times), e.g. 64 (512x512 images) or 96 (768x768)")
    check_timing_settings(dtype, device, rounds)


def build_unet(unet_name: str, dtype: torch.dtype, device: str) -> nn.Module:
    import diffusers  # only this suite needs it

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNETS[unet_name])
    # nn.Module's own `to`: diffusers' warns on every cast about modules kept in float32 (this U-Net has none)
    return nn.Module.to(unet, device=device, dtype=dtype).eval()


def unet_inputs(unet_name: str, latent: int, dtype: torch.dtype, device: str):
    """Latents [2, 4, L, L], the timestep and the text states [2, 77, cross_attention_dim]."""
    config = UNETS[unet_name]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(BATCH, config["in_channels"], latent, latent, generator=generator)
    context = torch.randn(BATCH, TEXT_TOKENS, config["cross_attention_dim"], generator=generator)
    return (latents.to(device=device, dtype=dtype), torch.tensor(TIMESTEP, device=device),
            context.to(device=device, dtype=dtype))


class UNetCall(nn.Module):
    """One denoiser call as a one-input model, so the timing helpers can time it: the latents in,
    the predicted noise out; the text states are cut to the latents' batch."""

    def __init__(self, unet: nn.Module, timestep: torch.Tensor, context: torch.Tensor):
        super().__init__()
        self.unet, self.timestep, self.context = unet, timestep, context

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, self.timestep, encoder_hidden_states=self.context[: len(latents)]).sample


def active_patches(unet: nn.Module) -> set[str]:
    """Which of tokenreduce and the original tomesd are on the U-Net now."""
    active = {"tokenreduce"} if tokenreduce.reducer_of(unet) is not None else set()
    if any(type(m).__name__ == "ToMeBlock" or getattr(m, "_tome_info", {}).get("hooks") for m in unet.modules()):
        active.add("tomesd")
    return active


def _remove_original(unet: nn.Module) -> None:
    if any(hasattr(m, "_tome_info") for m in unet.modules()):
        import tomesd

        tomesd.remove_patch(unet)
        for module in unet.modules():  # remove_patch leaves its settings on every module
            module.__dict__.pop("_tome_info", None)


def place(unet: nn.Module, case: Case, reducer=None) -> None:
    """Put `case` on the U-Net, after taking the other library's patch off: the two never run
    together. `reducer`: the case's reducer instance, kept across rounds."""
    if case.reducer == ORIGINAL:
        import tomesd

        tokenreduce.remove(unet)
        tomesd.apply_patch(unet, **case.params)
    else:
        _remove_original(unet)
        if case.reducer == NONE:
            tokenreduce.remove(unet)
        else:
            tokenreduce.apply(unet, reducer if reducer is not None else case.reducer,
                              **({} if reducer is not None else case.params))
    if len(active_patches(unet)) > 1:
        raise RuntimeError(f"{case.label}: tokenreduce and the original tomesd are both on the U-Net")


def unet_macs(unet: nn.Module, call: UNetCall, latents: torch.Tensor) -> tuple[float, float]:
    """MACs of one sample's unreduced call: the whole U-Net's (`core.macs.counted_macs`, attention
    through the math kernel so that it is counted) and its transformer blocks' (tokenreduce.stats,
    the part a reducer changes)."""
    tokenreduce.apply(unet, NONE)
    try:
        total = counted_macs(lambda: call(latents[:1]))
        blocks = tokenreduce.stats(unet)["macs"]
    finally:
        tokenreduce.remove(unet)
    return total, blocks


def peak_memory_mb(unet_name: str, case: Case, latent: int, dtype: str, device: str) -> float:
    """Peak memory of one call in a fresh process that builds the same U-Net; on either device the
    memory the call adds to what the weights and inputs hold."""
    return in_fresh_process("tokenreduce.bench.diffusion", "_peak_child", unet_name, case.reducer, case.params,
                            latent, dtype, device)


def _peak_child(unet_name, reducer, params, latent, dtype, device) -> float:
    unet = build_unet(unet_name, DTYPES[dtype], device)
    latents, timestep, context = unet_inputs(unet_name, latent, DTYPES[dtype], device)
    place(unet, Case("", reducer, params))
    call = UNetCall(unet, timestep, context)
    return peak_of_call(lambda: call(latents), lambda: call(latents[:1]), device, above_start=True)


def run(unet_name: str = "sd15", latent: int = 64, dtype: str = "float32", device: str = "cpu", rounds: int = 5,
        memory: bool = True, cases: list[Case] | None = None) -> list[dict]:
    """Time every case against the unreduced U-Net in the same interleaved rounds at one latent
    size, then read each one's peak memory; one row per case (`summarise`), with the settings. The
    original tomesd's cases are left out where the package is not installed."""
    check_settings(unet_name, [latent], dtype, device, rounds)
    cases = [c for c in (cases or default_cases()) if c.reducer != ORIGINAL or original_available()]
    before = load_average()
    seconds, block_macs, total = time_cases(build_unet(unet_name, DTYPES[dtype], device),
                                            unet_inputs(unet_name, latent, DTYPES[dtype], device), cases, rounds)
    load = Load.since(before)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the timed U-Net is gone; the memory processes build their own
    peaks = [peak_memory_mb(unet_name, c, latent, dtype, device) if memory else None for c in cases]
    settings = {"suite": "diffusion", "unet": unet_name, "latent": latent, "batch": BATCH, "dtype": dtype,
                "device": device, "rounds": rounds, **load.as_record()}
    return [{**settings, **row} for row in summarise(cases, seconds, block_macs, total, peaks)]


def time_cases(unet: nn.Module, inputs: tuple, cases: list[Case], rounds: int
               ) -> tuple[list[list[float]], list[float | None], float]:
    """Seconds of each case's calls in interleaved rounds after one warm-up call each, the transformer
    blocks' MACs per sample of each (None for the original tomesd, which has no stats) and the
    unreduced U-Net's MACs per sample. `inputs`: `unet_inputs`'. The U-Net is left unpatched."""
    if not cases or cases[0].reducer != NONE:
        raise ConfigError(f"cases: the first must be the unreduced call ({NONE!r}); got {cases[:1]!r}")
    latents, timestep, context = inputs
    call = UNetCall(unet, timestep, context)
    total, base_blocks = unet_macs(unet, call, latents)
    ours = [c.reducer not in (NONE, ORIGINAL) for c in cases]
    reducers = [create_reducer(c.reducer, **c.params) if mine else None for c, mine in zip(cases, ours, strict=True)]
    block_macs = [base_blocks] + [None] * (len(cases) - 1)
    warmed = iter(range(len(cases)))

    calls = itertools.count(1)
    started = time.perf_counter()

    def after_pass():  # the first calls follow each case's warm-up call, whose stats are the case's
        index = next(warmed, None)
        if index is not None and ours[index]:
            block_macs[index] = tokenreduce.stats(unet)["macs"]
        # a call of the SD 1.5 U-Net takes seconds to minutes on a CPU: say how far the rounds are
        print(f"  call {next(calls)} of {len(cases) * (rounds + 1)}, {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)

    setups = [functools.partial(place, unet, c, r) for c, r in zip(cases, reducers, strict=True)]
    try:
        with torch.inference_mode():
            seconds = interleaved_setup_times(call, setups, latents, warmup=1, rounds=rounds, on_timing=after_pass)
    finally:
        place(unet, cases[0])
    return seconds, block_macs, total


def summarise(cases: list[Case], seconds: list[list[float]], block_macs: list[float | None], unet_macs: float,
              peaks: list[float | None]) -> list[dict]:
    """One row per case from its seconds per call, its transformer blocks' MACs and its peak memory
    (None where not measured); the first case is the unreduced call.

    speedup: the unreduced median seconds over the case's; vs_original: our tomesd's speed over the
    original tomesd's at the same ratio; mac_fraction_blocks: the blocks' MACs over the unreduced
    blocks'; mac_fraction: the whole U-Net's (`unet_macs` per sample, unreduced), whose other layers
    do not change; memory: peak over the unreduced peak."""
    medians = [1 / images_per_second(1, s) for s in seconds]
    base_seconds, base_blocks, base_peak = medians[0], block_macs[0], peaks[0]
    original = {c.params.get("ratio"): m for c, m in zip(cases, medians, strict=True) if c.reducer == ORIGINAL}
    rows = []
    for case, spent, median, blocks, peak in zip(cases, seconds, medians, block_macs, peaks, strict=True):
        rival = original.get(case.params.get("ratio")) if case.reducer == "tomesd" else None
        rows.append({
            "case": case.label, "reducer": case.reducer, "params": case.params,
            "seconds": median, "seconds_per_call": spent, "spread": spread(spent),
            "speedup": base_seconds / median,
            "vs_original": rival / median if rival is not None else None,
            "block_macs": blocks,
            "mac_fraction_blocks": blocks / base_blocks if blocks is not None else None,
            "mac_fraction": (unet_macs - base_blocks + blocks) / unet_macs if blocks is not None else None,
            "peak_mb": peak,
            "memory": peak / base_peak if peak is not None and base_peak else None,
        })
    return rows


def _noisy(row: dict) -> bool:
    return spread_too_wide(row["spread"])


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table; a timing whose rounds disagree is marked."""
    head = ["case", "s/call", "speed-up", "vs original", "MACs (blocks)", "MACs (U-Net)", "peak MB", "memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        mark = NOISY if _noisy(r) else ""
        cells = [r["case"], f"{r['seconds']:.3f}{mark}", ratio_text(r["speedup"]), ratio_text(r["vs_original"]),
                 ratio_text(r["mac_fraction_blocks"], 3, ""), ratio_text(r["mac_fraction"], 3, ""),
                 "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}", ratio_text(r["memory"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict]) -> str:
    """A latent size's table with its settings above it and the published speed-up below it."""
    first = rows[0]
    load = Load(first["load_before"], first["load_after"], first["cores"], first["threads"])
    latent = first["latent"]
    lines = [
        f"diffusion: U-Net {first['unet']} (random weights), latent {latent}x{latent} ({8 * latent}x{8 * latent} "
        f"images), batch {first['batch']} (guidance), {TEXT_TOKENS} text tokens, device={first['device']} "
        f"dtype={first['dtype']} threads={first['threads']} rounds={first['rounds']}; {load.words()}",
        "",
        format_table(rows),
        "",
        "s/call: median seconds of one U-Net call; speed-up and memory against the unreduced call (memory: peak "
        "above weights and inputs); vs original: our tomesd's speed over the original tomesd's at the same ratio; "
        "MACs: fraction of the unreduced transformer blocks' and whole U-Net's"
        + (f"; {NOISY} rounds over {SPREAD_LIMIT:.0%} apart" if any(map(_noisy, rows)) else ""),
    ]
    if not original_available():
        lines.append("the original tomesd is not installed (pip install tomesd==0.1.3): its rows are left out")
    ours = next((r for r in rows if r["reducer"] == "tomesd" and r["params"].get("ratio") == 0.5), None)
    theirs = next((r for r in rows if r["reducer"] == ORIGINAL and r["params"].get("ratio") == 0.5), None)
    if ours is not None:
        setting = {"unet": first["unet"], "latent": latent, "ratio": 0.5}
        here = f"here tomesd ratio=0.5 {ratio_text(ours['speedup'])}" + (
            f", the original {ratio_text(theirs['speedup'])}" if theirs is not None else "")
        note = "" if setting == PUBLISHED_SETTING else " (not the published setting)"
        lines.append(f"published: {PUBLISHED_SPEEDUP:.2f}x (tomesd README: SD 1.5, 512x512, ratio 0.5, fp16 on an "
                     f"RTX 4090, a GPU figure for whole 50-step generations); {here} on {first['device']} "
                     f"{first['dtype']}{note}")
    return "\n".join(lines)
