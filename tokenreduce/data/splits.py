"""The three loaders of a datamodule whose splits differ only in their dataset and batch size."""

from __future__ import annotations

from torch.utils.data import DataLoader


class SplitLoaders:
    """Mixin: `train_set`, `val_set`, `test_set`, `batch_size`, `eval_batch_size` and a
    `_loader(dataset, batch_size, training)` give Lightning its three dataloaders."""

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, training=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, training=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, training=False)
