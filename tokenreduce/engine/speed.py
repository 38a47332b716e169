"""Timing a model's forward pass: images per second, measured the same way for every model."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


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


@torch.inference_mode()
def time_forward(model: nn.Module, images: torch.Tensor, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` forward passes on `images`, after `warmup` untimed ones."""
    device = images.device
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


def throughput(model: nn.Module, images: torch.Tensor, repeats: int = 5, warmup: int = 1) -> Timing:
    """Images per second from the median of `repeats` timed forward passes."""
    times = time_forward(model, images, repeats, warmup)
    median = sorted(times)[len(times) // 2]
    return Timing(
        images_per_s=images.shape[0] / median,
        seconds_per_batch=times,
        batch_size=images.shape[0],
        dtype=str(images.dtype).replace("torch.", ""),
        device=str(images.device),
    )
