"""The three loaders of a datamodule whose splits differ only in their dataset and batch size."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import DataLoader

from tokenreduce.data.resumable import ResumableLoader


class SplitLoaders:
    """Mixin: `train_set`, `val_set`, `test_set`, `batch_size`, `eval_batch_size` and
    `_loader_options(training)` (DataLoader keyword arguments) give Lightning its three dataloaders.

    Training batches come from a `ResumableLoader` whose order is drawn from `shuffle_seed` (the
    run's seed, set by the engine), split across the trainer's ranks.
    """

    shuffle_seed: int = 0

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return ResumableLoader(self.train_set, self.batch_size, seed=self.shuffle_seed, num_replicas=replicas,
                               rank=rank, **self._loader_options(training=True))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def _eval_loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size, **self._loader_options(training=False))

    def _loader_options(self, training: bool) -> dict:
        return {"num_workers": getattr(self, "num_workers", 0)}

    def eval_sizes(self) -> dict[str, int]:
        """The number of images of each evaluation split ("val", "test") set up so far, for `describe`."""
        return {split: len(getattr(self, f"{split}_set")) for split in ("val", "test") if hasattr(self, f"{split}_set")}


def resolved(root) -> str | None:
    """`root` as an absolute path without `~` or symlinks, so one folder has one name in every record."""
    return str(Path(os.path.expanduser(str(root))).resolve()) if root not in (None, "") else None
