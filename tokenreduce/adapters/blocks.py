"""The block loop every adapter runs: each block either unchanged or through its reducer, with a
fresh `ReductionState` per pass; and pooling by token size."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenreduce.core.contract import BlockReducer
from tokenreduce.core.state import ReductionState


def run_blocks(model: nn.Module, x: Tensor, extra, take: set[int] | None = None, last: int | None = None):
    """Run the blocks with reduction; return the tokens, the pass's state and the taken intermediates.

    `model` has `token_reducer`, `num_prefix_tokens`, `blocks`, `grad_checkpointing` and the hooks
    `_tr_start(state, extra)` (prepare the pass's state, e.g. positions) and
    `_tr_block_ops(block, state, extra, checkpointing)` (the block's steps for the reducer).
    `extra` is what the family's embedding produced besides the tokens (see `timm_vit.ReducedViT._tr_embed`).
    A batch of no images runs every block unreduced, so it gives the unpatched model's empty output.
    """
    reducer: BlockReducer = model.token_reducer
    num_prefix = model.num_prefix_tokens
    depth = len(model.blocks)
    # reducers rank, pair and gather the tokens of each image, which no reducer defines for no image
    removals = [0] * depth if x.shape[0] == 0 else reducer.removal_counts(depth, x.shape[1] - num_prefix)
    state = ReductionState.start(x, num_prefix, removals, reducer.prop_attn, reducer.trace_source)
    model._tr_start(state, extra)
    checkpointing = bool(model.grad_checkpointing) and torch.is_grad_enabled() and not torch.jit.is_scripting()
    taken = []
    for i, blk in enumerate(model.blocks[: depth if last is None else last + 1]):
        ops = model._tr_block_ops(blk, state, extra, checkpointing)
        state.begin_layer(x.shape[1])
        if x.shape[0] and reducer.acts_at(i, removals[i]):
            x = reducer.block_forward(ops, x, state, i, removals[i])
        else:
            x = ops.plain(x, state.attn_bias(x.dtype))
        state.end_layer(x.shape[1])
        if take is not None and i in take:
            taken.append(x)
    state.final_tokens = x.shape[1]
    return x, state, taken


def size_weighted_mean(x: Tensor, sizes: Tensor) -> Tensor:
    """[B, C] the mean of the tokens [B, N, C] weighted by their sizes [B, N, 1] (in float32)."""
    return ((x.float() * sizes).sum(dim=1) / sizes.sum(dim=1)).to(x.dtype)
