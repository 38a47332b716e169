"""Training batches that a resumed fine-tune continues exactly where the interrupted run stopped.

An epoch's order is a permutation drawn from (seed, epoch) and split across ranks as
`DistributedSampler` does (Lightning keeps such a sampler and calls its `set_epoch`). Every sample
carries a seed of its own, drawn from (seed, epoch, position), under which its random augmentation
runs, and every batch is collated under the seed of its first sample. A checkpoint stores the epoch
and how many batches were served (Lightning saves and restores any loader with `state_dict` and
`load_state_dict`); a resumed loader skips exactly those, without loading them, so the next batch is
the one the interrupted run would have seen, augmented the same way, whatever the number of workers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 32-bit seed from several integers (the CPU generator keeps only 32 bits of a seed)."""
    h = 0x9E3779B97F4A7C15
    for value in values:
        h = ((h ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
    return (h ^ (h >> 32)) & 0xFFFFFFFF


@contextmanager
def seeded_rng(seed: int):
    """torch's CPU generator and Python's `random` seeded for the block, then restored: the
    training process's own random streams (dropout, mixup) are left as they were."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class EpochOrder(DistributedSampler):
    """Yields `(index, sample_seed)` keys in the epoch's order, starting after `skip` samples once."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        start, self.skip = self.skip, 0
        for position in range(start, len(indices)):
            yield indices[position], mix_seed(self.seed, self.epoch, self.rank, position)


class SeededSamples(Dataset):
    """Reads `dataset[index]` under the sample's own seed; returns the sample and that seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with seeded_rng(seed):
            return self.dataset[index], seed


class SeededCollate:
    """Collates a batch of `(sample, seed)` under the first sample's seed (batch-level augmentation)."""

    def __init__(self, collate_fn: Callable | None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items: list):
        with seeded_rng(items[0][1]):
            return self.collate_fn([sample for sample, _ in items])


class ResumableLoader(DataLoader):
    """The training loader: full batches in `EpochOrder`, resumable mid-epoch from a checkpoint."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 collate_fn: Callable | None = None, **kwargs):
        order = EpochOrder(dataset, seed, num_replicas=num_replicas, rank=rank)
        super().__init__(SeededSamples(dataset), batch_size=batch_size, sampler=order, drop_last=True,
                         collate_fn=SeededCollate(collate_fn), **kwargs)
        self.order = order
        self.served = 0  # batches handed out in the current epoch, counting those skipped on resume
        self._resume_at = 0

    def __iter__(self):
        # a generator: the sampler (and any worker prefetch) starts at the first batch asked for,
        # after Lightning has set the epoch
        self.order.skip = self._resume_at * self.batch_size
        self.served, self._resume_at = self._resume_at, 0
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.order.epoch, "batches": self.served}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch after its served batches. A state saved at an epoch's end holds
        no position: the next epoch starts from its first batch."""
        if 0 < int(state["batches"]) < len(self):
            self.order.set_epoch(int(state["epoch"]))
            self._resume_at = int(state["batches"])
