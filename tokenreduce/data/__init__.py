"""LightningDataModules: ImageNet-layout image folders and synthetic images for smoke runs.

Both are built from the `data` config before the model, so a wrong path fails before any download
or compute, and are then bound to the model (`bind_model`) for its input size and transforms.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenreduce.data.fashion_mnist import FashionMNISTDataModule, read_idx
    from tokenreduce.data.folder import ImageFolderDataModule, check_split
    from tokenreduce.data.synthetic import SyntheticDataModule, SyntheticImages
    from tokenreduce.data.transforms import model_data_config

# Each name is imported on first use: the datamodules import lightning, which `import tokenreduce`
# (through cost.py's use of transforms.py) must not pay for.
_HOMES = {
    "FashionMNISTDataModule": "fashion_mnist",
    "read_idx": "fashion_mnist",
    "ImageFolderDataModule": "folder",
    "check_split": "folder",
    "SyntheticDataModule": "synthetic",
    "SyntheticImages": "synthetic",
    "model_data_config": "transforms",
}

__all__ = ["FashionMNISTDataModule", "ImageFolderDataModule", "read_idx", "SyntheticDataModule", "SyntheticImages", "check_split", "model_data_config"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
