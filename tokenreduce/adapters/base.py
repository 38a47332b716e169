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

    # The attention step in pieces, for reducers that act inside it (see TimmBlockOps).
    @property
    def training(self) -> bool:
        """Whether the block runs in training mode."""

    def attn_input(self, x: Tensor) -> Tensor:
        """What the attention reads (the pre-norm output, or x in a post-norm block)."""

    def attn_qk(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys [B, H, N, head_dim] of the attention input."""

    def attn_values(self, h: Tensor) -> Tensor:
        """Values [B, H, N, head_dim] of the attention input."""

    def attn_logits(self, q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        """Scaled q.k^T plus the additive bias, [B, H, N, N]."""

    def attn_output(self, probs: Tensor, v: Tensor, h: Tensor) -> Tensor:
        """The attention branch's output [B, N, C] from probabilities and values."""

    def attn_residual(self, x: Tensor, y: Tensor) -> Tensor:
        """x plus the attention branch's output, through the block's scaling and drop path."""
