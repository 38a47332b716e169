"""MSTM-like: importance-guided merging with multi-scale fusion (after Bian et al., arXiv 2306.04897).

The paper's equations are not available, so this is a reading of its description with every
choice a parameter (see docs/reducers/mstm.md): tokens the class token attends to most are crucial;
every other token merges into its most similar crucial token, weighted by importance and size, so
nothing is discarded; a coarse (pooled) copy of the patch grid is fused into the fine tokens
through a projection that starts at zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.core.macs import linear_macs
from tokenreduce.core.merge import Assignment
from tokenreduce.core.schedule import Schedule, no_cap
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, check_flag, check_number
from tokenreduce.reducers.base import ATTN, KEEP_RATIO, KEYS, Signals, TokenReducer, register_reducer
from tokenreduce.reducers.pruning import DEFAULT_LAYERS, require_class_token, top_tokens


class MultiScaleFusion(nn.Module):
    """Add a coarse view of the patch grid to the fine tokens.

    The patch tokens are average-pooled over `pool` x `pool` windows of the grid (a partial window
    at an odd edge averages what it has), normalised, projected, and every fine token gets the
    projected coarse token of its window added. The projection starts at zero, so the module is
    the identity until it is trained.
    """

    def __init__(self, dim: int, pool: int = 2):
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def macs(self, num_patches: int) -> int:
        """MACs of the projection for a square grid of `num_patches` patches (one image)."""
        side = math.ceil(math.isqrt(num_patches) / self.pool)
        return side * side * linear_macs(self)

    def forward(self, x: Tensor, num_prefix: int) -> Tensor:
        batch, n, dim = x.shape
        side = math.isqrt(n - num_prefix)
        if side * side != n - num_prefix:
            raise ConfigError(
                f"mstm: fusion needs a square patch grid, got {n - num_prefix} patch tokens; "
                "allowed: square inputs, or fusion=false"
            )
        grid = x[:, num_prefix:].transpose(1, 2).reshape(batch, dim, side, side)
        coarse = F.avg_pool2d(grid, self.pool, self.pool, ceil_mode=True, count_include_pad=False)
        rows, cols = coarse.shape[2:]
        coarse = coarse.flatten(2).transpose(1, 2).to(self.proj.weight.dtype)  # the module may be kept in float32
        coarse = self.proj(self.norm(coarse)).to(x.dtype).transpose(1, 2).reshape(batch, dim, rows, cols)
        fine = coarse.repeat_interleave(self.pool, dim=2).repeat_interleave(self.pool, dim=3)[:, :, :side, :side]
        return torch.cat([x[:, :num_prefix], x[:, num_prefix:] + fine.flatten(2).transpose(1, 2)], dim=1)


def _positions(mask: Tensor, count: int) -> Tensor:
    """[B, count] where each row of `mask` [B, N] is True (`count` times per row), in order."""
    if not torch.compiler.is_exporting():
        return mask.nonzero()[:, 1].reshape(mask.shape[0], count)
    # nonzero's shape depends on the data, which export cannot carry with a symbolic batch; this
    # costs a few more operations (about 3x nonzero's time on a CPU)
    slot = torch.where(mask, mask.long().cumsum(dim=1) - 1, count)  # the others go to a spare column
    index = torch.arange(mask.shape[1], device=mask.device).expand_as(slot)
    return slot.new_zeros(mask.shape[0], count + 1).scatter_(1, slot, index)[:, :count]


def crucial_assignment(importance: Tensor, keys: Tensor, num_crucial: int, num_prefix: int) -> Assignment:
    """Prefix and the `num_crucial` most important tokens stay (in their order); every other token
    goes to the crucial token whose key is most similar (cosine). importance [B, T], keys [B, N, d]."""
    keep = top_tokens(importance, num_crucial, num_prefix)
    n = keep.shape[1]
    slot = keep.long().cumsum(dim=1) - 1
    crucial_idx = _positions(keep[:, num_prefix:], num_crucial) + num_prefix
    other_idx = _positions(~keep, n - num_prefix - num_crucial)
    metric = F.normalize(keys.float(), dim=-1)
    others, crucial = (metric.gather(1, idx.unsqueeze(-1).expand(-1, -1, metric.shape[-1])) for idx in (other_idx, crucial_idx))
    best = (others @ crucial.transpose(1, 2)).argmax(dim=-1)
    dest = slot.scatter(1, other_idx, best + num_prefix)
    return Assignment(dest=dest, n_out=num_prefix + num_crucial, merged=~keep)


@register_reducer("mstm")
class MSTMLike(TokenReducer):
    """Merge the non-crucial tokens (lowest class-token attention) into their most similar crucial
    token, weighted by importance x size, at chosen layers; optionally fuse a coarse scale first.

    ratio:        fraction of the non-prefix tokens kept as crucial at each reducing layer
    layers:       reducing layers (0-based); None for every layer
    fusion:       add the trainable multi-scale fusion before the first reducing layer
    fusion_pool:  window (in patches) of the coarse scale
    prop_attn:    proportional attention (log size added to the attention logits)
    trace_source: keep the map from input patches to merged tokens
    """

    needs = frozenset({KEYS, ATTN})
    strength = (KEEP_RATIO,)
    cap = staticmethod(no_cap)

    def __init__(self, ratio: float = 0.7, layers: tuple[int, ...] | None = DEFAULT_LAYERS, fusion: bool = True,
                 fusion_pool: int = 2, prop_attn: bool = True, trace_source: bool = False):
        if ratio is None:
            raise ConfigError(f"{self.name}: ratio=None is invalid; allowed: a keep ratio in (0, 1]")
        check_flag(self.name, "fusion", fusion)
        check_number(self.name, "fusion_pool", fusion_pool, low=2, integer=True)
        super().__init__(Schedule(ratio=ratio, layers=layers, owner=self.name), prop_attn, trace_source)
        self.fusion_pool = fusion_pool
        self.fusion: MultiScaleFusion | None = None
        self.fusion_layer = min(layers) if layers else 0
        self._use_fusion = fusion

    def check_model(self, info) -> None:
        super().check_model(info)
        require_class_token(self, info)
        if self._use_fusion and (self.fusion is None or self.fusion.proj.in_features != info.embed_dim):
            self.fusion = MultiScaleFusion(info.embed_dim, self.fusion_pool)

    def acts_at(self, layer: int, removal: int) -> bool:
        return removal > 0 or (self.fusion is not None and layer == self.fusion_layer)

    def block_forward(self, ops, x: Tensor, state: ReductionState, layer: int, removal: int) -> Tensor:
        if self.fusion is not None and layer == self.fusion_layer:
            x = self.fusion(x, state.num_prefix)
            state.add_macs(self.fusion.macs(x.shape[1] - state.num_prefix))
        if removal == 0:
            return ops.plain(x, state.attn_bias(x.dtype))
        return super().block_forward(ops, x, state, layer, removal)

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        num_prefix = state.num_prefix
        importance = signals.cls_attn()
        num_crucial = x.shape[1] - num_prefix - removal
        assignment = crucial_assignment(importance[:, num_prefix:], signals.keys, num_crucial, num_prefix)
        state.add_macs(removal * num_crucial * signals.keys.shape[-1])
        weights = importance.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        return state.merge(x, assignment, "wavg", weights=weights)
