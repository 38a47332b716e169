"""The speed limit of a reduction: the same model running exactly a pass's token counts per layer
while paying nothing to choose the tokens.

`SpeedLimit.of(state)` reads the counts a reducer realised (tokens through each block's attention
and its MLP) and, run in the same model, makes every block keep the *first* tokens by slicing: no
scoring, matching, sorting, gathering or merging, and no proportional-attention bias. Its speedup
over the unreduced model is the most any reducer with those counts can reach on the device; a
reducer's speedup over it is its `of limit` (`make bench`, docs/benchmarks.md). The outputs mean
nothing: it is a yardstick for time, not a method.
"""

from __future__ import annotations

from torch import Tensor

from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import TokenReducer


class SpeedLimit(TokenReducer):
    """Keep the first tokens: `layers[l]` = (tokens through block l's attention, through its MLP),
    prefix tokens included, for a pass whose first block receives `layers[0][0]` tokens or more."""

    name = "limit"

    def __init__(self, layers: list[tuple[int, int]]):
        super().__init__(Schedule(r=0), prop_attn=False)
        self.layers = [(int(a), int(m)) for a, m in layers]
        self._params = {"layers": self.layers}

    @classmethod
    def of(cls, state: ReductionState) -> SpeedLimit:
        """The limit of the pass that left `state` (`model._tokenreduce.last_state`)."""
        return cls([(rec.tokens_attn, rec.tokens_mlp) for rec in state.records])

    def removal_counts(self, num_layers: int, num_tokens: int) -> list[int]:
        if num_layers != len(self.layers):
            raise ConfigError(f"limit: counts for {len(self.layers)} blocks; the model has {num_layers}")
        entering = [self.layers[0][0]] + [m for _, m in self.layers[:-1]]  # (block 0: as its attention sees)
        return [e - m for (_, m), e in zip(self.layers, entering, strict=True)]

    def acts_at(self, layer: int, removal: int) -> bool:
        return True

    def block_forward(self, ops, x: Tensor, state: ReductionState, layer: int, removal: int) -> Tensor:
        attn_tokens, mlp_tokens = self.layers[layer]
        if x.shape[1] < attn_tokens:
            raise ConfigError(f"limit: block {layer} receives {x.shape[1]} tokens, fewer than the {attn_tokens} "
                              "it should attend over; allowed: the input size of the pass the limit was read from")
        if x.shape[1] > attn_tokens:  # the case reduced before its attention (MCTF, DynamicViT)
            x = x[:, :attn_tokens]
            state.records[-1].tokens_attn = attn_tokens
        x, _ = ops.attention(x, None, frozenset())
        return ops.mlp(x[:, :mlp_tokens])
