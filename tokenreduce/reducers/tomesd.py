"""ToMe for Stable Diffusion (Bolya and Hoffman, CVPR-W 2023): merge, compute, unmerge per block."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tokenreduce.core.grid import (
    ATTN_SUBLAYER,
    CROSS_SUBLAYER,
    MLP_SUBLAYER,
    BlockPlan,
    GridBlock,
    check_levels,
    grid_destinations,
    grid_matching,
    grid_matching_macs,
    require_grid_model,
)
from tokenreduce.core.schedule import Schedule
from tokenreduce.errors import ConfigError, check_flag, check_number, is_list
from tokenreduce.reducers.base import ModelInfo, TokenReducer, register_reducer


def check_int(who: str, name: str, value, low: int) -> int:
    return check_number(who, name, value, low=low, integer=True)


def step_ratio(who: str, ratio, step: int | None, timestep: float | None, high: float) -> float:
    """The ratio of one pass: `ratio` itself, its entry for `step` (the last entry past the list's
    end), or `ratio(timestep)`, checked against [0, high]."""
    if callable(ratio):
        value = ratio(timestep)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        check_number(who, f"ratio(t={timestep})", value, low=0.0, high=high)
        return float(value)
    if is_list(ratio):
        return float(ratio[min(step, len(ratio) - 1)])
    return float(ratio)


@register_reducer("tomesd")
class ToMeSD(TokenReducer):
    """ToMe for Stable Diffusion, with tomesd 0.1.3's parameters and defaults.

    Each block finds its matching once from its input tokens: one destination per `sy x sx` cell
    of the latent grid (its position in the cell random per block with `use_rand`, else the
    top-left), every other token a source; each source picks its most cosine-similar destination and
    the `int(N * ratio)` most similar sources merge into theirs by mean. The merged tokens go
    through self-attention (`merge_attn`), the cross-attention's queries (`merge_crossattn`) and the
    MLP (`merge_mlp`), and every token takes its slot's output.

    ratio:          fraction of each block's tokens merged away, at most 1 - 1/(sx*sy); also a list
                    (one ratio per denoising step, the last one for later steps) or a callable of
                    the timestep (a number) returning the ratio
    max_downsample: merge in blocks whose downsampling of the latent grid is at most this (1: only
                    the finest U-Net level; the blocks of DiT, SD3 and Flux are all at 1)
    sx, sy:         the destination cell's width and height in tokens
    use_rand:       a random destination in each cell (off for odd batch sizes, as in tomesd: a
                    batch that cannot hold guidance pairs)
    seed:           seeds the random destinations (a generator of this reducer's own, on the CPU);
                    None starts it from torch's global random state, as tomesd does
    merge_attn, merge_crossattn, merge_mlp: which sub-layers run on merged tokens (SD3 and Flux
                    blocks: self-attention and MLP of the image tokens; no cross-attention)
    """

    strength = ()
    needs_timestep = False

    def __init__(self, ratio: float | list[float] | Callable[[float], float] = 0.5, max_downsample: int = 1,
                 sx: int = 2, sy: int = 2, use_rand: bool = True, merge_attn: bool = True,
                 merge_crossattn: bool = False, merge_mlp: bool = False, seed: int | None = None):
        who = self.name
        sx, sy = check_int(who, "sx", sx, 1), check_int(who, "sy", sy, 1)
        if sx * sy < 2:
            raise ConfigError(f"{who}: sx={sx}, sy={sy} is invalid: every token would be a destination, so "
                              "nothing could merge; allowed: integers >= 1 with sx * sy >= 2")
        high = 1 - 1 / (sx * sy)
        rule = f"[0, {high:g}] (one destination per sx * sy = {sx * sy} tokens stays)"
        per_step = callable(ratio) or is_list(ratio)
        if callable(ratio):
            pass
        elif is_list(ratio):
            if not ratio or not all(_fraction(v, high) for v in ratio):
                raise ConfigError(f"{who}: ratio={ratio!r} is invalid; allowed: a non-empty list of numbers in {rule}")
            ratio = [float(v) for v in ratio]
        elif not _fraction(ratio, high):
            raise ConfigError(f"{who}: ratio={ratio!r} is invalid; allowed: a number in {rule}, a list of them "
                              "(one per denoising step) or a callable of the timestep")
        check_int(who, "max_downsample", max_downsample, 1)
        for name, flag in (("use_rand", use_rand), ("merge_attn", merge_attn),
                           ("merge_crossattn", merge_crossattn), ("merge_mlp", merge_mlp)):
            check_flag(who, name, flag)
        if not (merge_attn or merge_crossattn or merge_mlp):
            raise ConfigError(f"{who}: merge_attn, merge_crossattn and merge_mlp are all false, so nothing would "
                              "merge; allowed: at least one of them true")
        if seed is not None:
            check_int(who, "seed", seed, 0)
        super().__init__(Schedule(r=0, owner=who), prop_attn=False)
        self.needs_timestep = per_step  # the adapter then tells each block its step and timestep
        self.ratio, self.max_downsample, self.sx, self.sy = ratio, max_downsample, sx, sy
        self.high = high
        self.use_rand, self.seed = use_rand, seed
        self.sublayers = frozenset(name for name, on in ((ATTN_SUBLAYER, merge_attn), (CROSS_SUBLAYER, merge_crossattn),
                                                         (MLP_SUBLAYER, merge_mlp)) if on)
        self.generator: torch.Generator | None = None
        self.reset_generator()

    def reset_generator(self) -> None:
        """Restart the random destinations from `seed` (or from torch's global random state)."""
        self.generator = torch.Generator()
        if self.seed is None:
            self.generator.set_state(torch.get_rng_state())
        else:
            self.generator.manual_seed(self.seed)

    def check_model(self, info: ModelInfo) -> None:
        check_levels(self.name, require_grid_model(self.name, info), self.max_downsample)

    def acts_at(self, layer: int, removal: int) -> bool:
        return False  # a grid model's blocks are planned by plan_block

    def plan_block(self, x: Tensor, block: GridBlock) -> BlockPlan | None:
        if block.downsample > self.max_downsample:
            return None
        ratio = step_ratio(self.name, self.ratio, block.step, block.timestep, self.high)
        r = int(x.shape[1] * ratio)
        if r <= 0:
            return None
        # an odd batch holds no guidance pairs, which the random destinations must share (tomesd)
        generator = self.generator if self.use_rand and x.shape[0] % 2 == 0 else None
        dst = grid_destinations(block.height, block.width, self.sx, self.sy, generator)
        matching = grid_matching(x, dst, r)
        if matching is None:
            return None
        n_dst = (block.height // self.sy) * (block.width // self.sx)
        return BlockPlan(assignment=matching, mode="mean", sublayers=self.sublayers,
                         reducer_macs=grid_matching_macs(x.shape[1], n_dst, x.shape[2]))


def _fraction(value, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
            and 0 <= value <= high)
