"""Shared fixtures: the tiny timm models every reducer is tested on, and inputs that fit them."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# timm's own test models: class token; registers + LayerScale + avg pool; registers + map pool;
# RMSNorm + avg pool. Each builds and runs on a CPU in milliseconds.
TINY_MODELS = ("test_vit", "test_vit2", "test_vit3", "test_vit4")


def make_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images_for(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A batch at the model's native input size."""
    _, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def narrow_vit_b_geometry(**kwargs) -> torch.nn.Module:
    """12 blocks, 196 patches + class token, as ViT-B/16 or DeiT at 224 (the geometry of the published
    token-count fixtures), but 48 channels wide so it runs in milliseconds."""
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", embed_dim=48, num_heads=2, **kwargs).eval()


@pytest.fixture
def clean_hydra():
    """A fresh Hydra around a test that composes or runs in-process (Hydra refuses a second
    initialisation in one process)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def one_thread():
    # tiny models: spreading their small kernels over several busy cores costs ten times more
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def narrow_vit():
    return narrow_vit_b_geometry()


def run(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


@pytest.fixture(params=TINY_MODELS)
def tiny_model(request):
    return make_model(request.param)


def counted_flops(model: torch.nn.Module, *args, **kwargs) -> int:
    """FLOPs of `model(*args, **kwargs)` as FlopCounterMode counts them (2 per multiply-accumulate),
    attention through the math kernel, which it decomposes into matrix products. It runs with
    gradients enabled: FlopCounterMode's module tracker failed under no_grad on some models."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


def cli(monkeypatch, *args: str) -> None:
    """`python -m tokenreduce ARGS`, in this process (the command line's translation included)."""
    from hydra.core.global_hydra import GlobalHydra

    from tokenreduce.__main__ import main

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tokenreduce", *args])
    try:
        main()
    finally:
        GlobalHydra.instance().clear()


# A ToMe that, at the training step SIGNAL_AT_STEP, sends its own process the signal SIGNAL (a
# deterministic Ctrl-C or SLURM SIGTERM); with BATCH_LOG it logs a fingerprint of every batch; with
# MARKER it first creates that file and waits a second (time for a test to close the output pipe).
SIGNALLING_PLUGIN = '''
import os, signal, time
from tokenreduce import register_reducer
from tokenreduce.reducers.tome import ToMe

@register_reducer("test_signalling")
class Signalling(ToMe):
    steps = 0

    def training_losses(self, context):
        Signalling.steps += 1
        if "BATCH_LOG" in os.environ:
            with open(os.environ["BATCH_LOG"], "a") as f:
                f.write(f"{float(context.images.double().sum()):.6f} {context.labels.tolist()}\\n")
        if Signalling.steps == int(os.environ.get("SIGNAL_AT_STEP", 0)):
            if "MARKER" in os.environ:
                open(os.environ["MARKER"], "w").close()
                time.sleep(1.0)
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
        return {}
'''
