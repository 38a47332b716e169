"""Side-by-side measurement of reducers against the unreduced model in one process.

Every case and its limit (the same token counts per layer taken by slicing, `SpeedLimit`) are timed
in the same interleaved rounds as the baseline, so machine noise hits all of them alike; the speedup
is the ratio of median images/s, `of limit` the case's speedup over its limit's, and the MAC fraction
the case's MACs over the unreduced model's (as everywhere in the project).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import tokenreduce
from tokenreduce.engine.speed import (
    DTYPES,
    SPREAD_LIMIT,
    compiling_many,
    images_per_second,
    interleaved_model_times,
    interleaved_times,
    peak_memory,
)
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import REDUCE_SCOPE, create_reducer
from tokenreduce.reducers.limit import SpeedLimit


@dataclass(frozen=True)
class Case:
    label: str
    reducer: str
    params: dict = field(default_factory=dict)


BASELINE = Case("baseline", "none")


def build(model_name: str, case: Case, dtype: torch.dtype, device: str):
    model = timm.create_model(model_name, pretrained=False).to(device=device, dtype=dtype).eval()
    return tokenreduce.apply(model, case.reducer, **case.params)


def images_for(batch: int, img_size: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, img_size, img_size, generator=generator).to(device=device, dtype=dtype)


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs its start and stop on file descriptor 2; keep the table clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@torch.inference_mode()
def check_timing_settings(dtype: str, device: str, rounds: int) -> None:
    """A ConfigError naming --rounds, --device or --dtype and what is allowed (the suites that time
    their cases in rounds on one device: diffusion, vlm); on a CPU float32 only."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"--rounds={rounds!r} is invalid; allowed: an integer >= 1")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        target = None
    if target is None or target.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device={device!r} is invalid; allowed: cpu, cuda, cuda:N")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={device!r} but this machine has no usable GPU; allowed here: cpu")
    allowed = list(DTYPES) if target.type == "cuda" else ["float32"]
    if dtype not in allowed:
        raise ConfigError(f"--dtype={dtype!r} is invalid on {target.type}; allowed there: {', '.join(allowed)}")


def spread_too_wide(value: float | None) -> bool:
    """A timing's rounds disagree: their spread (`engine.speed.spread`) is above SPREAD_LIMIT."""
    return (value or 0) > SPREAD_LIMIT


def ratio_text(value: float | None, digits: int = 2, unit: str = "x") -> str:
    """A table cell: "-" for a value not measured."""
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def reducer_share(model, images) -> float:
    """Fraction of one forward's CPU time spent inside the reducer's own matching and merging."""
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(images)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    inside = sum(e.cpu_time_total for e in events if e.key == REDUCE_SCOPE)
    return inside / total if total else 0.0


def peak_memory_mb(model_name: str, case: Case, batch: int, img_size: int, dtype: str, device: str) -> float:
    """Peak memory of one forward in a fresh process: the CUDA allocator's peak, or on the CPU the
    growth of the peak resident set over the resident set just before the forward (Linux)."""
    return in_fresh_process("tokenreduce.bench.harness", "_peak_child", model_name, case.reducer, case.params, batch,
                            img_size, dtype, device)


def in_fresh_process(module: str, function: str, *args):
    """`function(*args)` from `module`, run in a new Python process; the arguments are passed by their
    repr and the result comes back as JSON."""
    code = f"import json;from {module} import {function} as f;print(json.dumps(f(*{args!r})))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_child(model_name, reducer, params, batch, img_size, dtype, device) -> float:
    dtype = getattr(torch, dtype)
    model = build(model_name, Case("", reducer, params), dtype, device)
    images = images_for(batch, img_size, dtype, device)
    return peak_of_call(lambda: model(images), lambda: model(images[:1]), device)


def peak_of_call(call, warm, device: str, above_start: bool = False) -> float:
    """Peak memory of `call()`, in MB, after `warm()` (a smaller call that loads kernels and allocator
    pools): on the CPU the growth of the peak resident set over the resident set before the call; on
    CUDA the allocator's peak, or with `above_start` only what the call adds to the memory allocated
    before it (the weights and inputs excluded, as on the CPU)."""
    target = torch.device(device)
    with torch.inference_mode():
        warm()
        if target.type == "cuda" and not above_start:
            torch.cuda.synchronize(target)
            torch.cuda.reset_peak_memory_stats(target)
            call()
            return torch.cuda.max_memory_allocated(target) / 2**20
        with peak_memory(target) as peak:
            call()
    return peak.mb


def run(model_name: str, cases: list[Case], batch: int = 16, img_size: int = 224, dtype: str = "float32",
        device: str = "cpu", rounds: int = 5, memory: bool = True, compile: bool = False) -> list[dict]:
    """Measure the baseline, every case and every case's limit (`SpeedLimit`) in the same
    interleaved rounds, on one model whose reducer is swapped; one row per case with ratios
    against the baseline.

    compile: time each of them under `torch.compile` instead, as a model of its own (a compiled
    model is specialised to its reducer); MACs, tokens and the reducer's share still come from the
    eager pass."""
    torch_dtype = getattr(torch, dtype)
    all_cases = [BASELINE] + [c for c in cases if c != BASELINE]
    model = build(model_name, BASELINE, torch_dtype, device)
    images = images_for(batch, img_size, torch_dtype, device)
    reducers = [create_reducer(c.reducer, **c.params) for c in all_cases]
    rows, limits = [], []
    for case, reducer in zip(all_cases, reducers, strict=True):
        tokenreduce.apply(model, reducer)
        with torch.inference_mode():
            model(images)
        st = tokenreduce.stats(model)
        limits.append(SpeedLimit.of(model._tokenreduce.last_state))
        rows.append({
            "case": case.label, "reducer": case.reducer, "params": case.params, "batch": batch,
            "gmacs": st["macs"] / 1e9, "tokens_out": st["tokens"][-1],
            "reducer_share": reducer_share(model, images) if case.reducer != "none" else 0.0,
            "peak_mb": peak_memory_mb(model_name, case, batch, img_size, dtype, device) if memory else None,
        })
    timed = reducers + limits[1:]  # the baseline is its own limit
    with torch.inference_mode():
        if compile:
            with compiling_many(len(timed)):
                times = interleaved_model_times(compiled_models(model, timed), images, warmup=2, rounds=rounds)
        else:
            times = interleaved_times(model, timed, images, warmup=1, rounds=rounds)
    tokenreduce.remove(model)
    limit_times = times[:1] + times[len(reducers):]
    base = rows[0]
    for row, spent, limit_spent in zip(rows, times[: len(reducers)], limit_times, strict=True):
        row["images_per_s"] = images_per_second(batch, spent)
        row["limit_images_per_s"] = images_per_second(batch, limit_spent)
    for row in rows:
        row["speedup"] = row["images_per_s"] / base["images_per_s"]
        row["limit_speedup"] = row["limit_images_per_s"] / base["images_per_s"]
        row["of_limit"] = row["speedup"] / row["limit_speedup"]
        row["mac_fraction"] = row["gmacs"] / base["gmacs"]
        # the speed-up that runtime proportional to MACs would give is 1 / mac_fraction
        row["of_ideal"] = row["speedup"] * row["mac_fraction"]
    return rows


def compiled_models(model, reducers: list) -> list:
    """`torch.compile` of a copy of `model` with each reducer placed, with static shapes (run them
    inside `compiling_many`). Every reducer but `random` compiles to one graph;
    `random`'s own generator breaks the graph, and the time between its pieces is then part of its
    figure."""
    return [torch.compile(tokenreduce.apply(deepcopy(model), deepcopy(reducer)), dynamic=False) for reducer in reducers]


def format_rows(rows: list[dict]) -> str:
    head = f"{'case':<22}{'img/s':>8}{'speedup':>9}{'limit':>7}{'of limit':>10}{'MAC fraction':>14}{'GMACs':>8}" \
           f"{'tokens':>8}{'reducer %':>11}{'peak MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        lines.append(
            f"{r['case']:<22}{r['images_per_s']:>8.2f}{r['speedup']:>9.2f}{r['limit_speedup']:>7.2f}"
            f"{r['of_limit']:>10.2f}{r['mac_fraction']:>14.3f}{r['gmacs']:>8.2f}{r['tokens_out']:>8}"
            f"{100 * r['reducer_share']:>10.1f}%{peak:>9}"
        )
    return "\n".join(lines)
