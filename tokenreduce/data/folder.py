"""ImageNet-layout image folders: `<root>/<split>/<class>/<image>`, transforms from the model (timm)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from PIL import Image, ImageFile
from timm.data import create_transform
from torch import nn
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from tokenreduce.data.splits import SplitLoaders, resolved
from tokenreduce.data.transforms import model_data_config
from tokenreduce.errors import ConfigError

LAYOUT = "<root>/<split>/<class>/<image>"
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


def check_split(root: str | None, split: str, key: str = "data.root") -> Path:
    """The folder of one split, or a ConfigError naming the path and the config key to set."""
    if root is None or str(root) == "":
        raise ConfigError(
            f"{key} is not set; set {key}=/path/to/dataset (an ImageNet-layout folder {LAYOUT}), "
            "or the IMAGENET_ROOT environment variable for data=imagenet"
        )
    path = Path(os.path.expanduser(str(root))) / split
    if not path.is_dir():
        raise ConfigError(f"{key}={root}: the folder {path} does not exist; set {key} to a folder laid out as {LAYOUT}")
    classes = [entry for entry in os.scandir(path) if entry.is_dir()]
    if not classes:
        raise ConfigError(
            f"{key}={root}: the folder {path} has no class folders; set {key} to a folder laid out as {LAYOUT}"
        )
    if len(classes) < 2:  # a classifier needs two classes; one would always be right
        raise ConfigError(f"{key}={root}: the folder {path} has 1 class folder ({classes[0].name}); allowed: at "
                          f"least 2 class folders, laid out as {LAYOUT}")
    if not any(_has_image(entry.path) for entry in classes):
        raise ConfigError(f"{key}={root}: the class folders in {path} hold no images ({', '.join(IMG_EXTENSIONS)})")
    return path


class UnreadableImageError(ConfigError):
    """An image file that PIL cannot decode: truncated, corrupt, or not an image."""

    def __init__(self, message: str):
        # in a DataLoader worker the error comes back rebuilt from "Caught ... Original Traceback ...":
        # keep only this error's own line, so that it still reads as one line naming the file
        if message.startswith("Caught "):
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def load_rgb(path: str) -> Image.Image:
    """The image at `path` in RGB, read strictly: a truncated or corrupt file raises an error naming
    it, even where PIL's ImageFile.LOAD_TRUNCATED_IMAGES is set (which would fill the rest grey)."""
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"data.root: the image {path} cannot be read ({err}); replace it or remove it "
                                   "from the folder") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _has_image(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(name.lower().endswith(IMG_EXTENSIONS) for name in files):
            return True
    return False


class ImageFolderDataModule(SplitLoaders, L.LightningDataModule):
    """Train/val/test splits of an ImageNet-layout folder.

    Labels are the sorted class-folder names (so the 1000 ImageNet synsets get the standard
    indices). Evaluation transforms are timm's from the bound model's pretrained configuration
    (resize, center crop at its crop_pct, its mean and std); training adds `augment` (timm's
    `create_transform` arguments: random-resized crop, flip, RandAugment, random erasing).
    """

    def __init__(self, root: str | None = None, train_split: str = "train", val_split: str = "val",
                 test_split: str | None = None, batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int = 8, pin_memory: bool = True, augment: dict | None = None,
                 data_config: dict | None = None, name: str = "image_folder"):
        super().__init__()
        self.root = root
        self.name = name
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.augment = dict(augment or {})
        if "scale" in self.augment and self.augment["scale"] is not None:
            self.augment["scale"] = tuple(self.augment["scale"])
        self.data_config = data_config
        self.num_classes: int | None = None

    def check(self, stage: str) -> None:
        """Raise ConfigError unless every split `stage` reads holds class folders with images."""
        for split in STAGE_SPLITS.get(stage, ("val",)):
            check_split(self.root, self.splits[split])

    def describe(self) -> dict:
        return {"name": self.name, "root": resolved(self.root), "splits": dict(self.splits),
                "num_classes": self.num_classes, "images": self.eval_sizes()}

    def bind_model(self, model: nn.Module) -> None:
        """Resolve the transforms from the model and check its head against the class folders."""
        self.data_config = model_data_config(model)
        self.num_classes = len(self._classes(self.splits["val"]))
        model_classes = getattr(model, "num_classes", None)
        if model_classes and model_classes != self.num_classes:
            raise ConfigError(
                f"data.root={self.root} has {self.num_classes} classes but the model has {model_classes}; "
                f"set model.num_classes={self.num_classes} for a new head"
            )

    def _classes(self, split: str) -> list[str]:
        path = check_split(self.root, split)
        return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())

    def _dataset(self, split: str, training: bool) -> ImageFolder:
        if self.data_config is None:
            raise ConfigError("ImageFolderDataModule needs the model's data config; call bind_model(model) first")
        path = check_split(self.root, split)
        transform = create_transform(**self.data_config, is_training=training, **(self.augment if training else {}))
        try:
            return ImageFolder(str(path), transform=transform, loader=load_rgb)
        except FileNotFoundError as err:
            raise ConfigError(f"data.root={self.root}: {err}") from None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = self._dataset(self.splits["train"], training=True)
        if stage in (None, "fit", "validate"):
            self.val_set = self._dataset(self.splits["val"], training=False)
        if stage in (None, "test"):
            self.test_set = self._dataset(self.splits["test"], training=False)

    def _loader_options(self, training: bool) -> dict:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory and torch.cuda.is_available(),
                "persistent_workers": self.num_workers > 0}
