"""Fashion-MNIST: 70,000 28x28 grey images of clothing in 10 classes, read from the standard IDX files.

The default folder is where Debian's `dataset-fashion-mnist` package puts the files; elsewhere
`download=true` fetches the same files with torchvision into `root`. Images are shaped to the
bound model's input (zero-padded to a small model's size, or resized for a large one; repeated to
its channels) and normalised with the model's mean and std.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from tokenreduce.data.splits import SplitLoaders, resolved
from tokenreduce.data.transforms import model_data_config
from tokenreduce.errors import ConfigError, check_number

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
# IDX type codes -> (torch dtype, bytes per element, struct format of one element)
IDX_TYPES = {0x08: (torch.uint8, 1, "B"), 0x09: (torch.int8, 1, "b"), 0x0B: (torch.int16, 2, ">h"),
             0x0C: (torch.int32, 4, ">i"), 0x0D: (torch.float32, 4, ">f"), 0x0E: (torch.float64, 8, ">d")}
SCALINGS = ("auto", "pad", "resize")


def read_idx(path: str | Path, key: str = "data.root") -> Tensor:
    """The array stored in an IDX file (gzip-compressed or not), as a tensor of its stored type.

    A missing, truncated or malformed file is a ConfigError naming the path and the config key to set.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: the file {path} does not exist; set {key} to a folder holding "
                          f"the Fashion-MNIST IDX files ({', '.join(FILES['train'] + FILES['test'])})")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ConfigError(f"{key}: the file {path} is corrupt ({err}); reinstall it or set {key} to another folder") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise ConfigError(f"{key}: the file {path} is not an IDX file (bad header {raw[:4].hex() or 'empty'}); "
                          f"set {key} to a folder with the original files")
    dtype, width, fmt = IDX_TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{key}: the file {path} is truncated (header of {ndim} dimensions incomplete)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for dim in shape:
        count *= dim
    if len(raw) != header + count * width:
        raise ConfigError(f"{key}: the file {path} is corrupt: shape {tuple(shape)} needs {header + count * width} "
                          f"bytes, the file holds {len(raw)}; reinstall it or set {key} to another folder")
    body = bytearray(raw[header:])
    if width == 1:
        data = torch.frombuffer(body, dtype=dtype) if count else torch.empty(0, dtype=dtype)
    else:  # big-endian on disk
        data = torch.tensor(struct.unpack(f">{count}{fmt[-1]}", bytes(body)), dtype=dtype)
    return data.reshape(shape)


def load_split(root: str | Path, split: str, download: bool = False, key: str = "data.root") -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the `train` or `test` split."""
    root = Path(os.path.expanduser(str(root)))
    if download:
        _download(root)
    if not root.is_dir():
        raise ConfigError(f"{key}={root}: no such folder; install Debian's dataset-fashion-mnist "
                          f"(files in {DEBIAN_ROOT}), or set {key} to a folder with the IDX files, or set "
                          "data.download=true")
    image_file, label_file = FILES[split]
    images, labels = read_idx(root / image_file, key), read_idx(root / label_file, key)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ConfigError(f"{key}={root}: {image_file} holds {tuple(images.shape)} and {label_file} "
                          f"{tuple(labels.shape)}; expected [N, 28, 28] images and N labels")
    return images, labels.long()


def _download(root: Path) -> None:
    from torchvision.datasets import FashionMNIST

    if all((root / name).is_file() for names in FILES.values() for name in names):
        return
    # torchvision saves into <root>/FashionMNIST/raw; keep the .gz files it leaves there
    FashionMNIST(str(root), train=True, download=True)
    FashionMNIST(str(root), train=False, download=True)
    raw = root / "FashionMNIST" / "raw"
    for names in FILES.values():
        for name in names:
            if not (root / name).exists() and (raw / name).exists():
                (root / name).symlink_to(raw / name)


class ShapeImages(nn.Module):
    """uint8 28x28 grey images [B, 28, 28] -> float [B, C, H, W] at the model's input, normalised.

    scaling: "pad" centres the 28x28 image on a zero canvas of the model's size, "resize" scales it
    bilinearly (antialiased), "auto" pads when the model's input is at most 32 pixels.
    Training adds a random shift of up to `shift` pixels and a horizontal flip with probability `hflip`.
    """

    def __init__(self, input_size: tuple[int, int, int], mean, std, scaling: str = "auto",
                 shift: int = 0, hflip: float = 0.0):
        super().__init__()
        self.channels, self.height, self.width = input_size
        if scaling == "auto":
            scaling = "pad" if max(self.height, self.width) <= 32 else "resize"
        if scaling == "pad" and (self.height < 28 or self.width < 28):
            raise ConfigError(f"data.scaling=pad needs a model input of at least 28x28, not {self.height}x{self.width}; "
                              "allowed: resize")
        self.scaling = scaling
        self.shift = shift
        self.hflip = hflip
        self.register_buffer("mean", _per_channel(mean, self.channels), persistent=False)
        self.register_buffer("std", _per_channel(std, self.channels), persistent=False)

    def forward(self, images: Tensor, training: bool = False, generator: torch.Generator | None = None) -> Tensor:
        x = images.float().div(255).unsqueeze(1)
        if training and self.hflip > 0:
            flip = torch.rand(len(x), generator=generator) < self.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if training and self.shift > 0:
            x = _random_shift(x, self.shift, generator)
        if self.scaling == "pad":
            top, left = (self.height - 28) // 2, (self.width - 28) // 2
            x = F.pad(x, (left, self.width - 28 - left, top, self.height - 28 - top))
        elif (self.height, self.width) != (28, 28):
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False, antialias=True)
        x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


def _per_channel(values, channels: int) -> Tensor:
    values = torch.as_tensor(values, dtype=torch.float32).flatten()
    return values.expand(channels).clone() if values.numel() == 1 else values[:channels].clone()


def _random_shift(x: Tensor, shift: int, generator: torch.Generator | None) -> Tensor:
    """Each image moved by its own random offset in [-shift, shift] pixels, edges zero-filled."""
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(h)
    cols = offsets[:, 1, None] + torch.arange(w)
    batch = torch.arange(b)[:, None, None]
    return padded[:, 0][batch, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


class IndexedImages(Dataset):
    """uint8 images and labels held in memory; shaping happens per batch (see `collate`)."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


class FashionMNISTDataModule(SplitLoaders, L.LightningDataModule):
    """Fashion-MNIST train / val / test for a bound model.

    val: the last `val_size` images of the training split, held out from training (0: validate on
    the test split). test: the 10,000 test images, or the first `test_samples` of them.
    """

    def __init__(self, root: str = DEBIAN_ROOT, download: bool = False, val_size: int = 5000,
                 test_samples: int | None = None, batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int = 0, scaling: str = "auto", shift: int = 2, hflip: float = 0.5,
                 name: str = "fashion_mnist"):
        super().__init__()
        check_number("data", "val_size", val_size, low=0, high=SPLIT_SIZES["train"] - 1, integer=True)
        if test_samples is not None:
            check_number("data", "test_samples", test_samples, low=1, high=SPLIT_SIZES["test"], integer=True)
        check_number("data", "batch_size", batch_size, low=1, integer=True)
        if eval_batch_size is not None:
            check_number("data", "eval_batch_size", eval_batch_size, low=1, integer=True)
        check_number("data", "num_workers", num_workers, low=0, integer=True)
        check_number("data", "shift", shift, low=0, high=14, integer=True)
        check_number("data", "hflip", hflip, low=0, high=1)
        if scaling not in SCALINGS:
            raise ConfigError(f"data.scaling={scaling!r} is invalid; allowed: {', '.join(SCALINGS)}")
        if root is None or str(root) == "":
            raise ConfigError(f"data.root is not set; set data.root to a folder with the Fashion-MNIST IDX files "
                              f"(Debian's dataset-fashion-mnist puts them in {DEBIAN_ROOT})")
        self.root = str(root)
        self.download = download
        self.val_size = val_size
        self.test_samples = test_samples
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.scaling = scaling
        self.shift = shift
        self.hflip = hflip
        self.name = name
        self.num_classes = len(CLASSES)
        self.shaper: ShapeImages | None = None
        self.augmenter: ShapeImages | None = None

    def check(self, stage: str) -> None:
        """Read the files the stage needs now, so a missing or corrupt one fails before any compute."""
        splits = ("train",) if stage in ("fit", "validate") and self.val_size else ()
        splits += ("test",) if stage in ("test",) or (stage in ("fit", "validate") and not self.val_size) else ()
        for split in splits:
            load_split(self.root, split, self.download)

    def describe(self) -> dict:
        return {"name": self.name, "root": resolved(self.root), "val_size": self.val_size,
                "test_samples": self.test_samples or SPLIT_SIZES["test"], "num_classes": self.num_classes,
                "images": self.eval_sizes()}

    def bind_model(self, model: nn.Module) -> None:
        model_classes = getattr(model, "num_classes", None)
        if model_classes and model_classes != self.num_classes:
            raise ConfigError(f"Fashion-MNIST has {self.num_classes} classes but the model has {model_classes}; "
                              f"set model.num_classes={self.num_classes}")
        config = model_data_config(model)
        self.shaper = ShapeImages(config["input_size"], config["mean"], config["std"], self.scaling)
        self.augmenter = ShapeImages(config["input_size"], config["mean"], config["std"], self.scaling,
                                     shift=self.shift, hflip=self.hflip)

    def setup(self, stage: str | None = None) -> None:
        if self.shaper is None:
            raise ConfigError("FashionMNISTDataModule needs the model's input size; call bind_model(model) first")
        train_images, train_labels = load_split(self.root, "train", self.download)
        test_images, test_labels = load_split(self.root, "test", self.download)
        cut = len(train_labels) - self.val_size
        self.train_set = IndexedImages(train_images[:cut], train_labels[:cut])
        limit = self.test_samples or len(test_labels)
        self.test_set = IndexedImages(test_images[:limit], test_labels[:limit])
        self.val_set = IndexedImages(train_images[cut:], train_labels[cut:]) if self.val_size else self.test_set

    def _loader_options(self, training: bool) -> dict:
        shaper = self.augmenter if training else self.shaper

        def collate(items):
            images = torch.stack([image for image, _ in items])
            labels = torch.tensor([label for _, label in items])
            return shaper(images, training=training), labels

        return {"collate_fn": collate, "num_workers": self.num_workers}
