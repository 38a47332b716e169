"""What a reducer may know about a model and do with one block, independent of the model family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from tokenreduce.reducers.base import Signals


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a model that reducers check themselves against."""

    name: str
    depth: int
    num_prefix: int
    has_class_token: bool
    embed_dim: int
    num_heads: int


class BlockOps(Protocol):
    """The steps of one transformer block, as a reducer calls them."""

    def attention(self, x: Tensor, bias: Tensor | None, needs: frozenset[str]) -> tuple[Tensor, Signals]:
        """The attention residual step `x + attn(x)`, with the signals the reducer asked for."""

    def mlp(self, x: Tensor) -> Tensor:
        """The MLP residual step `x + mlp(x)`."""

    def plain(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The whole block, unchanged but for the proportional-attention bias."""
