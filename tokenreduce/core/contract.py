"""The contract between reducers and adapters, which depend on it and never on each other: what a
reducer may know about a model (`ModelInfo`, the `Patch` a reduced model carries), what it may do
with one block (`BlockOps`) and the signals a block computes for it; and what the block loop asks
of a reducer (`BlockReducer`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from torch import Tensor, nn

from tokenreduce.core.state import ReductionState

if TYPE_CHECKING:
    from tokenreduce.adapters.base import Adapter

# Signals a reducer may ask its blocks for.
KEYS = "keys"  # attention keys averaged over heads, [B, N, head_dim]
ATTN = "attn"  # attention probabilities, [B, H, N, N]; switches the block off the fused kernel
SIGNALS = frozenset({KEYS, ATTN})


@dataclass
class Signals:
    """What a block computed for its reducer, only the pieces the reducer declared in `needs`."""

    keys: Tensor | None = None
    attn: Tensor | None = None

    def cls_attn(self) -> Tensor:
        """Attention paid by the first (class) token to every token, averaged over heads: [B, N]."""
        return self.attn[:, :, 0].mean(dim=1)


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


class BlockReducer(Protocol):
    """What the block loop asks of a reducer (a `tokenreduce.TokenReducer`)."""

    prop_attn: bool
    trace_source: bool

    def removal_counts(self, num_layers: int, num_tokens: int) -> list[int]:
        """Tokens removed by each layer, given `num_tokens` non-prefix tokens entering layer 0."""

    def acts_at(self, layer: int, removal: int) -> bool:
        """Whether the block at `layer` runs `block_forward`; the others run unchanged."""

    def block_forward(self, ops: BlockOps, x: Tensor, state: ReductionState, layer: int, removal: int) -> Tensor:
        """One block with reduction."""

    def has_training_losses(self) -> bool:
        """Whether the method adds loss terms to a training step (`training_losses`)."""


# --- the patch a model carries ------------------------------------------------------------------
@dataclass
class Patch:
    """What `apply` attached to a model: the adapter that placed the reducer, the model's original
    class and facts, the adapter's options, and the last pass's state."""

    adapter: Adapter
    original_class: type
    info: ModelInfo
    options: dict = field(default_factory=dict)
    last_state: ReductionState | None = field(default=None, repr=False)

    def changed_options(self) -> dict:
        """The adapter's options that differ from their defaults (what records and reports name)."""
        return {key: value for key, value in self.options.items() if value != self.adapter.options[key][0]}

    def sizes_for(self, x: Tensor) -> Tensor | None:
        """The last pass's token sizes, if `x` has its batch and token count."""
        state = self.last_state
        if state is None or state.sizes is None or state.sizes.shape[:2] != x.shape[:2]:
            return None
        return state.sizes


def is_patched(model: nn.Module) -> bool:
    """Whether `tokenreduce.apply` placed a reducer into `model` (and `remove` has not taken it out)."""
    return isinstance(getattr(model, "_tokenreduce", None), Patch)
