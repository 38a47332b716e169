"""Timing a model's forward pass: images per second, measured the same way for every model."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPREAD_LIMIT = 0.10  # a timing's quartile spread (`spread`) above which its rounds are said to disagree
# a load average above the cores by more than this is a loaded machine: a run's own threads keep the
# average near the core count while it computes, so a quiet 2-core machine reads 2.0-2.3 (measured)
LOAD_MARGIN = 1.0
NOISY, LOADED = "~", "!"  # the marks of a timing whose rounds disagree, and of one timed on a loaded machine
TIMING_LEGEND = (f"{NOISY} the timing rounds disagree: their spread (upper - lower quartile of the seconds, over "
                 f"the median) is above {SPREAD_LIMIT:.0%}; {LOADED} the machine was loaded: its 1-minute load "
                 f"average was above its core count + {LOAD_MARGIN:g} before or after the timing")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PeakMemory:
    mb: float | None = None  # None until the block has ended, or where it cannot be read


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """The memory a block of code took at its peak, in MB, over what was held when it began (so the
    weights already loaded are not counted): on a GPU from the CUDA allocator, on the CPU the growth
    of the process's peak resident set (Linux; elsewhere `mb` stays None)."""
    peak = PeakMemory()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield peak
        synchronize(device)
        peak.mb = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return
    try:
        release_free_heap()
        reset_peak_resident()
        before = resident_mb("VmRSS")
    except OSError:
        yield peak
        return
    yield peak
    peak.mb = resident_mb("VmHWM") - before


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim), so that memory freed by
    earlier work, still resident, does not hide what the next block allocates."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library: nothing to release
        pass


def reset_peak_resident() -> None:
    """Reset the kernel's resident high-water mark (VmHWM) of this process (Linux). ru_maxrss cannot
    serve: a process started by fork and exec inherits its parent's high-water mark."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def resident_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable threads, this process's included), or None where
    the system keeps none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class Load:
    """The 1-minute load average before and after a timing, the machine's cores and torch's threads."""

    before: float | None
    after: float | None
    cores: int | None
    threads: int

    @classmethod
    def since(cls, before: float | None) -> Load:
        """The load now, beside `before`, read when the timing began."""
        return cls(before, load_average(), os.cpu_count(), torch.get_num_threads())

    def as_record(self) -> dict:
        return {"load_before": self.before, "load_after": self.after, "cores": self.cores, "threads": self.threads}

    def words(self) -> str:
        """E.g. "load average 1.9 before timing, 2.4 after, 2 cores"."""
        shown = ["-" if v is None else f"{v:.1f}" for v in (self.before, self.after)]
        return f"load average {shown[0]} before timing, {shown[1]} after, {self.cores or '?'} cores"


def spread(seconds: list[float]) -> float | None:
    """(upper - lower quartile) / median of the seconds of a timing's rounds: 0 when they agree; None
    without rounds. Quartiles, not the extremes: one round slowed by the machine moves the median
    (what images/s reads) no more than the others do. With 2 or 3 rounds it is (max - min) / median."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    count = len(ordered)
    return (ordered[(3 * count - 1) // 4] - ordered[count // 4]) / _median(ordered)


def timing_marks(measure: dict) -> str:
    """The marks of a timing given as a record's `measure` (`Timing.as_record`): NOISY when its rounds
    disagree (spread above SPREAD_LIMIT), LOADED when the load average before or after it exceeded the
    cores by more than LOAD_MARGIN; "" for a steady timing, and for a record without these readings."""
    loads = [v for v in (measure.get("load_before"), measure.get("load_after")) if v is not None]
    noisy = (measure.get("spread") or 0) > SPREAD_LIMIT
    loaded = bool(loads and measure.get("cores")) and max(loads) > measure["cores"] + LOAD_MARGIN
    return (NOISY if noisy else "") + (LOADED if loaded else "")


def union_marks(*marks: str) -> str:
    """The marks found in any of `marks`, each once, in a fixed order."""
    return "".join(m for m in (NOISY, LOADED) if any(m in each for each in marks))


def marks_note(measure: dict) -> str:
    """The marks of a timing with what they stand for in its numbers, e.g. "~! (rounds 35% apart, over
    10%; load average 7.9 over 2 cores)"; "" when unmarked."""
    marks = timing_marks(measure)
    reasons = []
    if NOISY in marks:
        reasons.append(f"rounds {measure['spread']:.0%} apart, over {SPREAD_LIMIT:.0%}")
    if LOADED in marks:
        peak = max(v for v in (measure.get("load_before"), measure.get("load_after")) if v is not None)
        reasons.append(f"load average {peak:.1f} over {measure['cores']} cores")
    return f"{marks} ({'; '.join(reasons)})" if marks else ""


@dataclass(frozen=True)
class Timing:
    images_per_s: float
    seconds_per_batch: list[float]
    batch_size: int
    dtype: str
    device: str
    autocast: str | None = None
    load: Load | None = None  # the machine's load around the timing

    @property
    def spread(self) -> float | None:
        return spread(self.seconds_per_batch)

    def as_record(self, **settings) -> dict:
        """The timing as a run record's `measure`: how it was measured (with `settings`, e.g. warmup and
        repeats), the seconds of every round, their spread and the machine's load."""
        return {"batch_size": self.batch_size, "dtype": self.dtype, "autocast": self.autocast, "device": self.device,
                **settings, "seconds_per_batch": self.seconds_per_batch, "spread": self.spread,
                **(self.load.as_record() if self.load else {})}

    @property
    def marks(self) -> str:
        return timing_marks(self.as_record())


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


def interleaved_times(model: nn.Module, reducers: list, images: torch.Tensor, warmup: int, rounds: int,
                      on_timing: Callable[[], None] | None = None) -> list[list[float]]:
    """Seconds of one pass of `model` with each reducer (placed in turn by `tokenreduce.apply`), in
    `rounds` interleaved rounds after `warmup` passes each, so that machine noise hits all alike.
    `on_timing()` is called after each reducer's warm-up and each timed pass (for progress)."""
    from tokenreduce.api import apply

    setups = [functools.partial(apply, model, r) for r in reducers]
    return interleaved_setup_times(model, setups, images, warmup, rounds, on_timing)


def interleaved_setup_times(model: nn.Module, setups: list[Callable[[], object]], images: torch.Tensor, warmup: int,
                            rounds: int, on_timing: Callable[[], None] | None = None) -> list[list[float]]:
    """`interleaved_times` with each case put in place by its own `setup()`, called before the case's
    passes and outside the clock: for cases that are not reducers, e.g. another library's patch."""

    def with_setup(setup):
        def timed(repeats: int, warmup: int) -> list[float]:
            setup()
            return time_forward(model, images, repeats=repeats, warmup=warmup)
        return timed

    return _interleaved([with_setup(s) for s in setups], warmup, rounds, on_timing)


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


def _interleaved(timers: list, warmup: int, rounds: int, on_timing: Callable[[], None] | None = None
                 ) -> list[list[float]]:
    done = on_timing or (lambda: None)
    for timed in timers:
        timed(repeats=0, warmup=warmup)
        done()
    times = [[] for _ in timers]
    for _ in range(rounds):
        for timed, spent in zip(timers, times, strict=True):
            spent += timed(repeats=1, warmup=0)
            done()
    return times


def images_per_second(batch_size: int, seconds_per_batch: list[float]) -> float:
    """Batch size over the median time: robust to the odd pass slowed by the machine."""
    return batch_size / _median(seconds_per_batch)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def throughput(model: nn.Module, images: torch.Tensor, repeats: int = 5, warmup: int = 1,
               autocast: torch.dtype | None = None) -> Timing:
    """Images per second from the median of `repeats` timed forward passes, with the machine's load."""
    before = load_average()
    times = time_forward(model, images, repeats, warmup, autocast)
    return Timing(
        images_per_s=images_per_second(images.shape[0], times),
        seconds_per_batch=times,
        batch_size=images.shape[0],
        dtype=str(images.dtype).replace("torch.", ""),
        device=str(images.device),
        autocast=str(autocast).replace("torch.", "") if autocast is not None else None,
        load=Load.since(before),
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
