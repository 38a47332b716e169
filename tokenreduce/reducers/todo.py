"""ToDo: token downsampling of self-attention's keys and values (Smith et al., arXiv 2402.13573)."""

from __future__ import annotations

import functools
import math

from torch import Tensor

from tokenreduce.core.grid import (
    KV_MODES,
    BlockPlan,
    GridBlock,
    check_levels,
    downsample_tokens,
    downsampled_size,
    require_grid_model,
)
from tokenreduce.core.schedule import Schedule
from tokenreduce.errors import ConfigError, check_number, is_list
from tokenreduce.reducers.base import ModelInfo, TokenReducer, register_reducer


@register_reducer("todo")
class ToDo(TokenReducer):
    """Self-attention attends to keys and values read from the block's tokens resampled onto a
    coarser grid; the queries keep every token, so the output needs no unmerging.

    downsample:     each side of the grid divided by this factor (rounded down); an integer for
                    every block within `max_downsample`, or a list with one factor per level
                    (entry i for the blocks at downsampling 2**i; levels past the list keep
                    their keys)
    mode:           "nearest-exact" (the paper's default), "nearest", "bilinear", or "avg" (the
                    mean over each output cell)
    max_downsample: downsample in blocks whose downsampling of the latent grid is at most this
                    (1: only the finest U-Net level; the blocks of DiT, SD3 and Flux are all at 1)
    """

    strength = ()
    needs_timestep = False

    def __init__(self, downsample: int | list[int] = 2, mode: str = "nearest-exact", max_downsample: int = 1):
        who = self.name
        if is_list(downsample):
            if not downsample or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in downsample):
                raise ConfigError(f"{who}: downsample={downsample!r} is invalid; allowed: an integer >= 2, or a "
                                  "non-empty list of integers >= 1 (one per level)")
            downsample = list(downsample)
            if all(v == 1 for v in downsample):
                raise ConfigError(f"{who}: downsample={downsample!r} keeps every level's keys, so it would change "
                                  "nothing; allowed: at least one factor >= 2")
        else:
            check_number(who, "downsample", downsample, low=2, integer=True)
        if mode not in KV_MODES:
            raise ConfigError(f"{who}: mode={mode!r} is invalid; allowed: {', '.join(map(repr, KV_MODES))}")
        check_number(who, "max_downsample", max_downsample, low=1, integer=True)
        super().__init__(Schedule(r=0, owner=who), prop_attn=False)
        self.downsample, self.mode, self.max_downsample = downsample, mode, max_downsample

    def factor_at(self, block_downsample: int) -> int:
        """The factor of the blocks at this downsampling of the latent grid (1: untouched)."""
        if block_downsample > self.max_downsample:
            return 1
        if not is_list(self.downsample):
            return self.downsample
        level = round(math.log2(block_downsample))
        return self.downsample[level] if level < len(self.downsample) else 1

    def check_model(self, info: ModelInfo) -> None:
        info = require_grid_model(self.name, info)
        check_levels(self.name, info, self.max_downsample)
        if not any(self.factor_at(d) > 1 for d in info.block_downsample):
            raise ConfigError(
                f"{self.name}: downsample={self.downsample!r} with max_downsample={self.max_downsample} sets a "
                f"factor of 1 at every level of {info.name} (blocks at downsampling "
                f"{', '.join(map(str, info.levels()))}), so it would change nothing; allowed: a factor >= 2 at one "
                "of those levels")

    def acts_at(self, layer: int, removal: int) -> bool:
        return False  # a grid model's blocks are planned by plan_block

    def plan_block(self, x: Tensor, block: GridBlock) -> BlockPlan | None:
        factor = self.factor_at(block.downsample)
        if factor <= 1 or downsampled_size(block.height, block.width, factor) == (block.height, block.width):
            return None
        kv = functools.partial(downsample_tokens, height=block.height, width=block.width, factor=factor, mode=self.mode)
        return BlockPlan(sublayers=frozenset(), kv_tokens=kv)
