"""Offline models behind tokenreduce.models.create_model, and the fast failure when a hub is out of reach."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config

import tokenreduce
from tokenreduce import models
from tokenreduce.data.fashion_mnist import FashionMNISTDataModule
from tokenreduce.errors import ConfigError
from tokenreduce.models.fmnist import WEIGHTS


def test_offline_models_are_listed_and_built():
    assert "fmnist_vit" in models.available()
    assert set(models.describe()) == set(models.available())
    assert models.is_model("fmnist_vit") and models.is_model("vit_small_patch16_224")
    assert not models.is_model("no_such_model")
    with pytest.raises(ConfigError, match="model.name='no_such_model' is not a model; allowed: an offline model"):
        models.create_model("no_such_model")


def test_fmnist_vit_geometry_meets_the_published_schedules():
    model = models.create_model("fmnist_vit", pretrained=False)
    assert model.patch_embed.num_patches >= 64 and len(model.blocks) >= 8
    assert model.num_classes == 10 and model.pretrained_cfg["input_size"] == (1, 32, 32)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def fmnist_images(count: int = 6) -> torch.Tensor:
    """uint8 [count, 28, 28] grey images with every value 0..255, no zero border."""
    return torch.randint(0, 256, (count, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_fmnist_vit_project_transform_pads_28_to_32_and_normalises():
    model = models.create_model("fmnist_vit", pretrained=False)
    images = fmnist_images()
    datamodule = FashionMNISTDataModule()
    datamodule.bind_model(model)
    expected = torch.zeros(len(images), 1, 32, 32)  # 2 zero pixels each side, then Fashion-MNIST's mean and std
    expected[:, 0, 2:30, 2:30] = images.float() / 255
    expected = (expected - 0.2860) / 0.3530
    torch.testing.assert_close(datamodule.shaper(images), expected)


def test_fmnist_vit_timms_standard_transform_is_the_projects():
    model = models.create_model("fmnist_vit", pretrained=False)
    transform = create_transform(**resolve_data_config({}, model=model))
    images = fmnist_images()
    theirs = torch.stack([transform(Image.fromarray(image.numpy(), mode="L")) for image in images])
    datamodule = FashionMNISTDataModule()
    datamodule.bind_model(model)
    assert torch.equal(theirs, datamodule.shaper(images))


def test_fmnist_vit_is_pretrained_by_default_from_the_shipped_file():
    assert WEIGHTS.is_file(), f"the shipped weights {WEIGHTS} are missing"
    assert WEIGHTS.stat().st_size <= 10 * 2**20
    shipped = load_file(str(WEIGHTS))
    model = models.create_model("fmnist_vit")
    state = model.state_dict()
    assert set(shipped) == set(state)
    for name, value in shipped.items():
        assert torch.equal(state[name], value.to(state[name].dtype)), name
    random = models.create_model("fmnist_vit", pretrained=False)
    assert not torch.equal(random.head.weight, model.head.weight)


def test_a_local_checkpoint_replaces_the_source_weights(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("fmnist_vit")
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    for name in ("fmnist_vit", "vit_small_patch16_224"):
        if name == "vit_small_patch16_224":
            source = timm.create_model(name, img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=2)
            save_file(source.state_dict(), str(path))
            model = models.create_model(name, checkpoint=str(path), img_size=32, patch_size=4, embed_dim=48,
                                        depth=2, num_heads=2)
        else:
            model = models.create_model(name, checkpoint=str(path))
        assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    with pytest.raises(ConfigError, match="model.checkpoint=.*missing.pt: no such file"):
        models.create_model("fmnist_vit", checkpoint=str(tmp_path / "missing.pt"))


def test_unreachable_hub_fails_at_once_naming_the_ways_out(monkeypatch):
    calls = []

    def refuse(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(models, "_hf_cached", lambda repo, filename: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        models.create_model("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=True)
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "model.checkpoint" in message and "fmnist_vit" in message and "model.pretrained=false" in message
    assert calls and calls[0][0][0] == "huggingface.co" and calls[0][1] <= 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        models.create_model("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=True)
    # random weights need no network
    assert models.create_model("vit_small_patch16_224", pretrained=False, depth=1) is not None


def test_engine_builds_offline_models_and_labels_their_weights():
    from tokenreduce.engine.run import build_model, weights_label

    cfg = {"name": "fmnist_vit", "pretrained": False}
    model = build_model(cfg)
    assert weights_label(cfg, model) == "random"
    assert weights_label({"name": "fmnist_vit", "pretrained": True}, model) == "offline:fmnist_vit"
    tokenreduce.apply(model, "tome", r=4)
    with torch.no_grad():
        model(torch.zeros(1, 1, 32, 32))
    assert tokenreduce.stats(model)["tokens"][-1] == 65 - 8 * 4


def test_an_offline_checkpoint_with_another_head_keeps_the_backbone(tmp_path):
    source = models.create_model("fmnist_vit", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = models.create_model("fmnist_vit", checkpoint=str(path), num_classes=3)
    assert model.head.out_features == 3
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ConfigError, match="does not fit"):
        models.create_model("fmnist_vit", checkpoint=str(path))


# --- fmnist_diffusion: the class-conditional diffusion model shipped in the package ----------------------
def sample_accuracy(per_class: int, **sampler) -> float:
    """fmnist_vit's top-1 on `per_class` samples of each class of the shipped fmnist_diffusion, drawn by
    `sample` with its defaults except `sampler`."""
    from tokenreduce.diffusion_sampling import sample
    from tokenreduce.engine.generation import FmnistJudge
    from tokenreduce.models.fmnist_diffusion import load_fmnist_diffusion

    classes = [c for c in range(10) for _ in range(per_class)]
    images = torch.cat([sample(load_fmnist_diffusion(), classes[i:i + 100], seed=i, **sampler)
                        for i in range(0, len(classes), 100)])
    return FmnistJudge(reference_images=2, device=torch.device("cpu")).accuracy((images + 1) / 2, classes)


def test_fmnist_diffusion_ships_weights_that_draw_recognisable_garments():
    pytest.importorskip("diffusers", reason="fmnist_diffusion is a diffusers model (the diffusion extra)")
    from tokenreduce.models.fmnist_diffusion import CONFIG, WEIGHTS, load_fmnist_diffusion

    assert WEIGHTS.is_file(), f"the shipped weights {WEIGHTS} are missing"
    assert WEIGHTS.stat().st_size <= 20 * 2**20
    model = load_fmnist_diffusion()
    assert not model.training and {k: model.config[k] for k in CONFIG} == CONFIG
    shipped = load_file(str(WEIGHTS))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shipped.items())
    # one sample of each class at the default sampler settings: trained weights draw the class asked for
    # (random ones 0.1 at best); the 1,000-sample figure is the slow test below
    assert sample_accuracy(1) >= 0.7


def test_the_generate_task_samples_as_the_sampler_does_by_default():
    import inspect

    from omegaconf import OmegaConf

    from tokenreduce.diffusion_sampling import sample

    defaults = inspect.signature(sample).parameters
    conf = Path(__file__).resolve().parents[1] / "conf"
    config = OmegaConf.load(conf / "config.yaml").generate
    training = OmegaConf.load(conf / "experiment" / "train_fmnist_diffusion.yaml").diffusion.samples
    for section in (config, training):
        assert (section.steps, section.guidance) == (defaults["steps"].default, defaults["guidance"].default)


@pytest.mark.slow
def test_fmnist_diffusion_draws_the_class_asked_for_in_four_of_five_samples():
    pytest.importorskip("diffusers", reason="fmnist_diffusion is a diffusers model (the diffusion extra)")
    assert sample_accuracy(100) >= 0.8  # 1,000 samples, seeds 0..999, at the default sampler settings
