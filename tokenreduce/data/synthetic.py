"""Random images and labels, generated on the fly from a seed: runs anywhere, costs no disk."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

from tokenreduce.data.resumable import mix_seed
from tokenreduce.data.splits import SplitLoaders
from tokenreduce.data.transforms import model_data_config
from tokenreduce.errors import ConfigError


class SyntheticImages(Dataset):
    """`num_samples` images of shape `input_size`: Gaussian noise plus `signal` times a fixed
    pattern of the image's class, so a model can learn the labels when `signal > 0`.

    Sample i is drawn from the seed and `first_index + i`, so it is the same on every call and in
    every process, and two sets with disjoint index ranges share the class patterns but no image.
    """

    def __init__(self, num_samples: int, num_classes: int, input_size: tuple[int, int, int], seed: int = 0,
                 signal: float = 1.0, first_index: int = 0):
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.seed = seed
        self.signal = signal
        self.first_index = first_index

    def __len__(self) -> int:
        return self.num_samples

    def _generator(self, stream: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, stream, index))

    def label(self, index: int) -> int:
        generator = self._generator(0, self.first_index + index)
        return int(torch.randint(self.num_classes, (1,), generator=generator))

    def pattern(self, label: int) -> torch.Tensor:
        return torch.randn(self.input_size, generator=self._generator(1, label))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        label = self.label(index)
        image = torch.randn(self.input_size, generator=self._generator(2, self.first_index + index))
        if self.signal:
            image = image + self.signal * self.pattern(label)
        return image, label


class SyntheticDataModule(SplitLoaders, L.LightningDataModule):
    """Train and validation sets of `SyntheticImages` at the bound model's input size; the test set
    is the validation set."""

    def __init__(self, train_samples: int = 64, val_samples: int = 32, num_classes: int | None = None,
                 signal: float = 1.0, seed: int = 0, batch_size: int = 8, num_workers: int = 0,
                 input_size: tuple[int, int, int] | None = None, name: str = "synthetic"):
        super().__init__()
        for key, value in (("train_samples", train_samples), ("val_samples", val_samples),
                           ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key}={value!r} is invalid; allowed: an integer >= 1")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ConfigError(f"data.num_classes={num_classes!r} is invalid; allowed: null or an integer >= 1")
        self.name = name
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.num_classes = num_classes
        self.signal = signal
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = batch_size
        self.num_workers = num_workers
        self.input_size = tuple(input_size) if input_size is not None else None

    def check(self, stage: str) -> None:
        """Nothing on disk; training drops incomplete batches, so it needs one full batch."""
        if stage == "fit" and self.train_samples < self.batch_size:
            raise ConfigError(
                f"data.train_samples={self.train_samples} is smaller than data.batch_size={self.batch_size}; "
                "allowed: train_samples >= batch_size (incomplete training batches are dropped)"
            )

    def describe(self) -> dict:
        return {"name": self.name, "train_samples": self.train_samples, "val_samples": self.val_samples,
                "num_classes": self.num_classes,
                "input_size": list(self.input_size) if self.input_size else None, "seed": self.seed,
                "signal": self.signal, "images": self.eval_sizes()}

    def bind_model(self, model: nn.Module) -> None:
        """Take the input size and, unless configured, the number of classes from the model."""
        if self.input_size is None:
            self.input_size = tuple(model_data_config(model)["input_size"])
        model_classes = getattr(model, "num_classes", None)
        if self.num_classes is None:
            self.num_classes = model_classes
        elif model_classes and self.num_classes > model_classes:
            raise ConfigError(
                f"data.num_classes={self.num_classes} exceeds the model's {model_classes} classes; "
                f"allowed: at most {model_classes}, or set model.num_classes"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.input_size is None or self.num_classes is None:
            raise ConfigError("SyntheticDataModule needs input_size and num_classes; call bind_model(model) first")
        common = dict(num_classes=self.num_classes, input_size=self.input_size, seed=self.seed, signal=self.signal)
        self.train_set = SyntheticImages(self.train_samples, **common)
        self.val_set = SyntheticImages(self.val_samples, first_index=self.train_samples, **common)
        self.test_set = self.val_set
