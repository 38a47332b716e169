"""Token reduction on a 2-D latent grid, for models whose blocks must give every token an output
(diffusion U-Nets and DiTs): what such a model tells its reducers, what a reducer decides for one
block, and the grid maths (ToMe for Stable Diffusion's matching, ToDo's key/value downsampling).

A block reduces by *merge, compute, unmerge*: the reducer plans once from the block's input
(`GridReducer.plan_block`), the adapter merges the input of the chosen sub-layers, runs them on the
merged tokens and gives every token its slot's output (`core.merge.unmerge`). The block's output
keeps every token in its place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.contract import ModelInfo
from tokenreduce.core.merge import Assignment, Matching, stable_argsort
from tokenreduce.errors import ConfigError

# sub-layers of a block that a plan may run on merged tokens
ATTN_SUBLAYER, CROSS_SUBLAYER, MLP_SUBLAYER = "attn", "crossattn", "mlp"
SUBLAYERS = (ATTN_SUBLAYER, CROSS_SUBLAYER, MLP_SUBLAYER)
KV_MODES = ("nearest-exact", "nearest", "bilinear", "avg")


@dataclass(frozen=True)
class GridModelInfo(ModelInfo):
    """ModelInfo of a model whose transformer blocks run on a 2-D token grid and keep every token.

    block_downsample: each block's downsampling of the model's input grid, in the order the blocks
                      run (1 at the finest resolution; a U-Net's levels 1, 2, 4, 8; a DiT's blocks
                      all 1, as its patch grid is its only resolution)
    layout:           words for messages (e.g. "U-Net", "single-resolution transformer")
    """

    block_downsample: tuple[int, ...] = ()
    layout: str = ""

    def levels(self) -> list[int]:
        return sorted(set(self.block_downsample))


@dataclass(frozen=True)
class GridBlock:
    """What a reducer knows of one block when it plans: its place, its token grid (row-major,
    `height * width` tokens) and the denoising step of the pass."""

    index: int
    num_blocks: int
    height: int
    width: int
    downsample: int
    step: int | None = None  # the denoising step (counted by the adapter), None when not tracked
    timestep: float | None = None


@dataclass
class BlockPlan:
    """What a reducer decided for one block.

    assignment: slots of the block's tokens (from its input), applied around the sub-layers in
                `sublayers`; None merges nothing
    mode:       how tokens that share a slot combine (`core.merge.combine`'s modes), with
                `combine_kwargs`
    sizes:      [B, n_out, 1] tokens per slot, for proportional attention (None: no bias)
    kv_tokens:  self-attention reads its keys and values from `kv_tokens(h)` instead of its input
                `h` [B, N, C] (ToDo); the queries, and so the output, keep every token
    reducer_macs: the reducer's own MACs for one sample (its similarity matrix)
    """

    assignment: Assignment | None = None
    mode: str = "mean"
    combine_kwargs: dict = field(default_factory=dict)
    sublayers: frozenset[str] = frozenset({ATTN_SUBLAYER})
    sizes: Tensor | None = None
    kv_tokens: Callable[[Tensor], Tensor] | None = None
    reducer_macs: int = 0


@runtime_checkable
class GridReducer(Protocol):
    """A reducer that plans per block on a token grid (tomesd, todo); the placement is the adapter's."""

    needs_timestep: bool

    def plan_block(self, x: Tensor, block: GridBlock) -> BlockPlan | None:
        """The plan of one block from its input tokens `x` [B, N, C]; None leaves the block as it is."""


def require_grid_model(who: str, info: ModelInfo) -> GridModelInfo:
    """`info` as a GridModelInfo; a ConfigError naming `who` for any other model."""
    if not isinstance(info, GridModelInfo):
        raise ConfigError(
            f"{who}: runs on diffusion models whose blocks keep every token on a latent grid (diffusers "
            f"U-Nets, DiT/PixArt and SD3/Flux transformers); model {info.name} is not one; allowed: such a model, or a "
            "reducer for token-dropping encoders such as 'tome'")
    return info


def check_levels(who: str, info: GridModelInfo, max_downsample: int) -> None:
    """A ConfigError when no block of the model runs at a downsampling <= `max_downsample`."""
    if not any(d <= max_downsample for d in info.block_downsample):
        levels = ", ".join(map(str, info.levels()))
        raise ConfigError(
            f"{who}: max_downsample={max_downsample} selects no block of {info.name} ({info.layout}), whose "
            f"transformer blocks run at downsampling {levels}, so it would change nothing; allowed: "
            f"max_downsample >= {info.levels()[0]}")


def slot_representatives(assignment: Assignment) -> Tensor:
    """[B, n_out] long: the token whose position each slot keeps (e.g. its rotary embedding row): a
    matching's kept token (the destination of its merges); for another assignment the first token
    of the slot that no other token absorbed, else the slot's first token."""
    if isinstance(assignment, Matching):
        return assignment.reps
    dest, n_out = assignment.dest, assignment.n_out
    b, n = dest.shape
    rank = torch.arange(n, device=dest.device).expand(b, n)
    if assignment.merged is not None:  # absorbed tokens rank after every other member
        rank = rank + n * assignment.merged.long()
    first = torch.full((b, n_out + 1), 2 * n, dtype=torch.long, device=dest.device)
    first.scatter_reduce_(1, dest, rank, reduce="amin")
    return first[:, :n_out] % n


# --- ToMe for Stable Diffusion's matching -----------------------------------------------------------
def grid_destinations(height: int, width: int, sx: int, sy: int, generator: torch.Generator | None = None) -> Tensor:
    """[height * width] bool on the CPU, row-major: one destination per `sy x sx` cell of the grid,
    at a cell position drawn from `generator` (a CPU generator, one draw per cell), or the cell's
    top-left without one. Rows and columns left over at the bottom and right edges hold none."""
    cells_h, cells_w = height // sy, width // sx
    if generator is None:
        pick = torch.zeros(cells_h, cells_w, dtype=torch.long)
    else:
        pick = torch.randint(sy * sx, (cells_h, cells_w, 1), generator=generator)[..., 0]
    rows = torch.arange(cells_h).unsqueeze(1) * sy + pick // sx
    cols = torch.arange(cells_w).unsqueeze(0) * sx + pick % sx
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[rows, cols] = True
    return mask.flatten()


@torch.no_grad()
def grid_matching(metric: Tensor, destinations: Tensor, r: int) -> Matching | None:
    """Merge the `r` sources (tokens that are not destinations) most cosine-similar to their best
    destination into it.

    metric:       [B, N, C], compared by cosine similarity
    destinations: [N] bool on the CPU (so finding them waits for no device), the same for every sample
    Slots: every token that is not merged, in the input's order. None when nothing merges.
    """
    batch, n, _ = metric.shape
    dst = destinations.nonzero().flatten().to(metric.device, non_blocking=True)
    src = (~destinations).nonzero().flatten().to(metric.device, non_blocking=True)
    r = min(r, src.numel())
    if r <= 0 or dst.numel() == 0:
        return None
    m = F.normalize(metric.float(), dim=-1)
    scores = m.index_select(1, src) @ m.index_select(1, dst).transpose(1, 2)
    best, partner = scores.max(dim=-1)
    order = stable_argsort(best, descending=True)
    sources = src[order[:, :r]]
    targets = dst[partner.gather(1, order[:, :r])]
    kept = torch.ones(batch, n, dtype=torch.bool, device=metric.device).scatter_(1, sources, False)
    slot_of = kept.long().cumsum(dim=1) - 1  # a kept token's slot: its rank among the kept tokens
    reps = stable_argsort(kept.byte(), descending=True)[:, : n - r]
    return Matching(reps, sources, slot_of.gather(1, targets), n)


def grid_matching_macs(num_tokens: int, num_destinations: int, dim: int) -> int:
    """Multiply-accumulates of the sources x destinations similarity matrix for one sample."""
    return (num_tokens - num_destinations) * num_destinations * dim


# --- ToDo's key/value downsampling ----------------------------------------------------------------
def downsampled_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """The grid of the keys and values: each side divided by `factor`, rounded down, at least 1."""
    return max(1, height // factor), max(1, width // factor)


def downsample_tokens(x: Tensor, height: int, width: int, factor: int, mode: str = "nearest-exact") -> Tensor:
    """Tokens [B, height * width, C] (row-major) resampled onto the grid `downsampled_size` gives:
    by interpolation (`mode` "nearest-exact", "nearest", "bilinear") or by the mean over each output
    cell ("avg", adaptive average pooling, which covers edge rows a factor does not divide)."""
    if mode not in KV_MODES:
        raise ConfigError(f"downsample mode={mode!r} is invalid; allowed: {', '.join(map(repr, KV_MODES))}")
    b, n, c = x.shape
    if n != height * width:
        raise ConfigError(f"downsample_tokens: {n} tokens do not fill a {height} x {width} grid")
    size = downsampled_size(height, width, factor)
    if size == (height, width):
        return x
    grid = x.transpose(1, 2).reshape(b, c, height, width)
    if mode == "avg":
        out = F.adaptive_avg_pool2d(grid, size)
    else:
        out = F.interpolate(grid, size=size, mode=mode)
    return out.flatten(2).transpose(1, 2)
