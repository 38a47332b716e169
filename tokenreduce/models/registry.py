"""The registry of offline model sources (`register_offline_model`), which `create_model` builds from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class OfflineModel:
    name: str
    description: str
    build: Callable[..., nn.Module]  # build(pretrained: bool, **timm_kwargs) -> model
    pretrained: bool  # whether create_model loads the weights when `pretrained` is not given


_OFFLINE: dict[str, OfflineModel] = {}


def register_offline_model(name: str, description: str, pretrained: bool = True):
    """Decorator: `build(pretrained, **kwargs)` makes the model `name` without a network."""

    def wrap(build):
        if name in _OFFLINE:
            raise ValueError(f"an offline model named {name!r} is already registered")
        _OFFLINE[name] = OfflineModel(name, description, build, pretrained)
        return build

    return wrap


def available() -> list[str]:
    """The models whose pretrained weights load offline."""
    return sorted(_OFFLINE)


def describe() -> dict[str, str]:
    """Offline model name -> one line on what it is."""
    return {name: _OFFLINE[name].description for name in available()}


def offline_model(name: str) -> OfflineModel | None:
    """The offline source registered as `name`, if any."""
    return _OFFLINE.get(name)
