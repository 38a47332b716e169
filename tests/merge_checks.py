"""A per-layer invariant check for reducers that merge or fuse: after every merge of a pass, sizes
add up to the tokens of the input and agree with the source map, and prefix tokens stay first."""

from __future__ import annotations

import torch

from tokenreduce.core.state import ReductionState


def check_every_merge(monkeypatch) -> list[int]:
    """Patch `ReductionState.merge` to check the invariants after each call; returns the token count
    after each checked merge (so a test can see the checks ran)."""
    counts = []
    original = ReductionState.merge

    def merge(self, x, assignment, mode="wavg", **kwargs):
        out = original(self, x, assignment, mode, **kwargs)
        if assignment is not None and self.source is not None:
            batch, total = self.source.shape
            prefix = self.num_prefix
            assert int(self.source.max()) < out.shape[1]  # no input token is lost
            members = torch.zeros(batch, out.shape[1]).scatter_add_(1, self.source, torch.ones(batch, total))
            assert torch.equal(members, self.sizes[..., 0])
            assert torch.equal(self.source[:, :prefix], torch.arange(prefix).expand(batch, -1))
            assert torch.equal(self.sizes[:, :prefix], torch.ones(batch, prefix, 1))
            counts.append(out.shape[1])
        return out

    monkeypatch.setattr(ReductionState, "merge", merge)
    return counts
