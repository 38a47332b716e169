"""The input configuration of a timm model: size, interpolation, crop, normalisation."""

from __future__ import annotations

from timm.data import resolve_data_config
from torch import nn


def model_data_config(model: nn.Module) -> dict:
    """timm's data configuration for `model`, with the input size the model was built for.

    `timm.create_model(..., img_size=S)` keeps the pretrained config's input size, so the size is
    taken from the patch embedding when the two differ.
    """
    config = resolve_data_config({}, model=model)
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is not None and tuple(img_size) != tuple(config["input_size"][1:]):
        config["input_size"] = (config["input_size"][0], *img_size)
    return config
