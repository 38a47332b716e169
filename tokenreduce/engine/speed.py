"""Timing a model's forward pass: images per second, measured the same way for every model."""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    images_per_s: float
    seconds_per_batch: list[float]
    batch_size: int
    dtype: str
    device: str
    autocast: str | None = None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def time_forward(model: nn.Module, images: torch.Tensor, repeats: int = 5, warmup: int = 1,
                 autocast: torch.dtype | None = None) -> list[float]:
    """Wall-clock seconds of `repeats` forward passes on `images`, after `warmup` untimed ones.

    `autocast`: run under `torch.autocast` with this dtype (mixed precision) instead of the
    dtype of the model and images. On a GPU every pass is synchronised before the clock is read.
    """
    device = images.device
    with _autocast(device, autocast):
        for _ in range(warmup):
            model(images)
        synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return times


def interleaved_times(model: nn.Module, reducers: list, images: torch.Tensor, warmup: int, rounds: int
                      ) -> list[list[float]]:
    """Seconds of one pass of `model` with each reducer (placed in turn by `tokenreduce.apply`), in
    `rounds` interleaved rounds after `warmup` passes each, so that machine noise hits all alike."""
    from tokenreduce.api import apply

    def with_reducer(reducer):
        def timed(repeats: int, warmup: int) -> list[float]:
            apply(model, reducer)
            return time_forward(model, images, repeats=repeats, warmup=warmup)
        return timed

    return _interleaved([with_reducer(r) for r in reducers], warmup, rounds)


def interleaved_model_times(models: list[nn.Module], images: torch.Tensor, warmup: int, rounds: int
                            ) -> list[list[float]]:
    """Seconds of one pass of each of `models` (e.g. compiled ones, which cannot swap reducers) in
    `rounds` interleaved rounds after `warmup` passes each."""
    return _interleaved([functools.partial(time_forward, m, images) for m in models], warmup, rounds)


@contextlib.contextmanager
def compiling_many(count: int):
    """Let torch.compile compile the same code once for each of `count` models (its default stops
    recompiling after 8 and runs the rest eagerly). Compile them with `dynamic=False`: otherwise a
    model that differs from an earlier one in a token count is compiled as a dynamic-shape graph."""
    with torch._dynamo.config.patch(recompile_limit=count + 8, accumulated_recompile_limit=64 * (count + 8)):
        yield


def _interleaved(timers: list, warmup: int, rounds: int) -> list[list[float]]:
    for timed in timers:
        timed(repeats=0, warmup=warmup)
    times = [[] for _ in timers]
    for _ in range(rounds):
        for timed, spent in zip(timers, times, strict=True):
            spent += timed(repeats=1, warmup=0)
    return times


def images_per_second(batch_size: int, seconds_per_batch: list[float]) -> float:
    """Batch size over the median time: robust to the odd pass slowed by the machine."""
    return batch_size / sorted(seconds_per_batch)[len(seconds_per_batch) // 2]


def throughput(model: nn.Module, images: torch.Tensor, repeats: int = 5, warmup: int = 1,
               autocast: torch.dtype | None = None) -> Timing:
    """Images per second from the median of `repeats` timed forward passes."""
    times = time_forward(model, images, repeats, warmup, autocast)
    return Timing(
        images_per_s=images_per_second(images.shape[0], times),
        seconds_per_batch=times,
        batch_size=images.shape[0],
        dtype=str(images.dtype).replace("torch.", ""),
        device=str(images.device),
        autocast=str(autocast).replace("torch.", "") if autocast is not None else None,
    )


def resolve_device(device: str) -> torch.device:
    """"auto" is the current GPU when there is one, else the CPU; a GPU that is not there is a ConfigError."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"measure.device={device!r} is invalid; allowed: auto, cpu, cuda, cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"measure.device={device!r} but this machine has no usable GPU; allowed here: auto, cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"measure.device={device!r} but this machine has {count} GPU(s); allowed: cuda:0 to "
                              f"cuda:{count - 1}, auto, cpu")
    elif resolved.type != "cpu":
        raise ConfigError(f"measure.device={device!r} is invalid; allowed: auto, cpu, cuda, cuda:N")
    return resolved


def probe_dtypes(dtype: torch.dtype, autocast: torch.dtype | None, device: torch.device) -> None:
    """Run a tiny attention-shaped computation in `dtype` (and under `autocast`) on `device`, so a
    combination the device cannot compute fails here, before any evaluation, not after it."""
    x = torch.ones(2, 3, 8, device=device, dtype=dtype)
    weight = torch.ones(8, 8, device=device, dtype=dtype)
    try:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            attn = (F.layer_norm(x, (8,)) @ weight @ x.transpose(1, 2)).softmax(-1)
            F.gelu(attn @ x).sum().item()
    except (RuntimeError, AssertionError) as err:
        setting = f"measure.dtype={_name(dtype)}" + (f" with measure.autocast={_name(autocast)}" if autocast else "")
        raise ConfigError(f"{setting} cannot run on {device}: {str(err).splitlines()[0]}; allowed there: "
                          "float32") from None


def _name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def resolve_dtype(name: str | None, key: str, allow_none: bool = False) -> torch.dtype | None:
    if name is None and allow_none:
        return None
    if name not in DTYPES:
        allowed = ", ".join(DTYPES) + (", null" if allow_none else "")
        raise ConfigError(f"{key}={name!r} is invalid; allowed: {allowed}")
    return DTYPES[name]


def check_measure(batch_size: int, dtype: str = "float32", autocast: str | None = None, device: str = "auto",
                  warmup: int = 3, repeats: int = 10,
                  probe: bool = False) -> tuple[torch.dtype, torch.dtype | None, torch.device]:
    """Validate the `measure` settings (a ConfigError naming the key); the resolved dtypes and device.
    With `probe`, also check that the device computes in those dtypes (`probe_dtypes`)."""
    for key, value, least in (("batch_size", batch_size, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"measure.{key}={value!r} is invalid; allowed: an integer >= {least}")
    resolved = (resolve_dtype(dtype, "measure.dtype"), resolve_dtype(autocast, "measure.autocast", allow_none=True),
                resolve_device(device))
    if probe:
        probe_dtypes(*resolved)
    return resolved


def measure(model: nn.Module, input_size: tuple[int, int, int], batch_size: int, dtype: str = "float32",
            autocast: str | None = None, device: str = "auto", warmup: int = 3, repeats: int = 10,
            seed: int = 0) -> Timing:
    """Images/s of `model` on a batch of random images of `input_size`, in eval mode.

    The model is moved to the measuring device; a model cast to another dtype is a copy, so
    `model` keeps its own weights and dtype.
    """
    torch_dtype, autocast_dtype, target = check_measure(batch_size, dtype, autocast, device, warmup, repeats)
    param = next(model.parameters(), None)
    timed = copy.deepcopy(model) if param is not None and param.dtype != torch_dtype else model
    timed.to(device=target, dtype=torch_dtype)
    was_training = timed.training
    timed.eval()
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, *input_size, generator=generator).to(device=target, dtype=torch_dtype)
    try:
        return throughput(timed, images, repeats=repeats, warmup=warmup, autocast=autocast_dtype)
    finally:
        timed.train(was_training)
