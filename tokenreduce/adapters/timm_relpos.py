"""Placing a reducer into timm's ViTs with a relative position bias: BEiT (v1 and v2, timm's `Beit`)
and the `vit_relpos_*` / `vit_srelpos_*` models (timm's `VisionTransformerRelPos`).

Their attention adds to every logit a learned bias of the offset between the query's and the key's
grid positions: a table over the (2H-1) x (2W-1) offsets (BEiT, `rel_pos_type="bias"`) or an MLP of
the log-spaced offsets (`vit_relpos_*`), per block or shared by all blocks; with a class token, three
more entries (class to patch, patch to class, class to class). Once tokens merge, the bias must
follow their positions:
- The pass's state carries each token's grid position (row, column) through every merge and
  pruning step, as for RoPE: a merged token takes its destination's position, or with
  `adapter_options={"merged_position": "mean"}` the size-weighted mean of its members' positions.
- The bias of two tokens is the table at the offset of their positions. At whole offsets that is
  timm's own entry; at a fractional offset (mean positions) it is the bilinear interpolation of the
  four entries around it. An MLP bias is evaluated, as timm does, once per block (once per pass
  when shared) on the whole-offset grid and then read the same way.
Blocks before the first reduction run as timm defines them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import RelPosBias, RelPosMlp
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.vision_transformer_relpos import (
    RelPosAttention,
    RelPosBlock,
    ResPostRelPosBlock,
    VisionTransformerRelPos,
)
from torch import Tensor, nn

from tokenreduce.adapters.base import ModelInfo, register_adapter
from tokenreduce.adapters.timm_vit import (
    ReducedViT,
    TimmBlockOps,
    TimmViTAdapter,
    attention_forward,
    model_name,
    size_weighted_mean,
)
from tokenreduce.core.contract import Signals
from tokenreduce.core.macs import linear_macs
from tokenreduce.core.merge import POSITION_RULES
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import UnsupportedModelError

POOLS = ("", "avg", "token")
BLOCKS = {Beit: (BeitBlock,), VisionTransformerRelPos: (RelPosBlock, ResPostRelPosBlock)}
ATTENTIONS = {Beit: BeitAttention, VisionTransformerRelPos: RelPosAttention}


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not."""
    name = model_name(model)
    kind = next((cls for cls in BLOCKS if isinstance(model, cls)), None)
    if kind is None:
        raise UnsupportedModelError(f"model {name} ({type(model).__name__}) is not a timm Beit or "
                                    "VisionTransformerRelPos")
    if model.global_pool not in POOLS:
        raise UnsupportedModelError(f"model {name} pools with global_pool={model.global_pool!r}; supported: "
                                    f"{', '.join(map(repr, POOLS))}")
    grid = tuple(model.patch_embed.grid_size)
    for i, blk in enumerate(model.blocks):
        if type(blk) not in BLOCKS[kind] or type(blk.attn) is not ATTENTIONS[kind]:
            raise UnsupportedModelError(
                f"model {name} block {i} is {type(blk).__name__} with {type(blk.attn).__name__}; supported: "
                f"{', '.join(b.__name__ for b in BLOCKS[kind])} with {ATTENTIONS[kind].__name__}")
        for source in bias_sources(model, blk):
            if type(source) not in (BeitAttention, RelPosBias, RelPosMlp) and not _has_table(source):
                raise UnsupportedModelError(
                    f"model {name} block {i} has relative position bias {type(source).__name__}; supported: a bias "
                    "table (BEiT, RelPosBias) or RelPosMlp")
            if tuple(source.window_size) != grid:
                raise UnsupportedModelError(
                    f"model {name} block {i} has a relative position window {tuple(source.window_size)} that is not "
                    f"its patch grid {grid}; supported: one window over the whole grid")
    return ModelInfo(name=name, depth=len(model.blocks), num_prefix=model.num_prefix_tokens,
                     has_class_token=model.cls_token is not None, embed_dim=model.embed_dim,
                     num_heads=model.blocks[0].attn.num_heads)


def _has_table(module: nn.Module) -> bool:
    return getattr(module, "relative_position_bias_table", None) is not None


def bias_sources(model: nn.Module, block: nn.Module) -> list[nn.Module]:
    """The modules whose biases a block's attention adds up, as timm's forward adds them."""
    attn = block.attn
    if isinstance(model, Beit):  # the block's own table plus the shared one
        return [m for m in (attn if _has_table(attn) else None, model.rel_pos_bias) if m is not None]
    # VisionTransformerRelPos: the block's own, else the shared one
    return [m for m in (attn.rel_pos if attn.rel_pos is not None else model.shared_rel_pos,) if m is not None]


# --- the bias at any positions -------------------------------------------------------------------
@dataclass(frozen=True)
class OffsetTable:
    """A relative position bias over whole offsets: `grid` [2H-1, 2W-1, heads], indexed by
    (row offset + H - 1, column offset + W - 1) of query minus key; `prefix` [3, heads] the class to
    patch, patch to class and class to class entries (None: zero)."""

    grid: Tensor
    prefix: Tensor | None

    @staticmethod
    def of(source: nn.Module) -> OffsetTable:
        """The table a timm bias module holds (evaluating an MLP bias on the whole offsets)."""
        h, w = source.window_size
        if isinstance(source, RelPosMlp):
            values = source.bias_act(source.mlp(source.rel_coords_log))
            if source.bias_gain is not None:
                values = source.bias_gain * values
            return OffsetTable(grid=values, prefix=None)
        table = source.relative_position_bias_table
        n = (2 * h - 1) * (2 * w - 1)
        return OffsetTable(grid=table[:n].view(2 * h - 1, 2 * w - 1, -1), prefix=table[n:] if len(table) > n else None)

    def __add__(self, other: OffsetTable) -> OffsetTable:
        if self.prefix is None or other.prefix is None:
            prefix = self.prefix if other.prefix is None else other.prefix
        else:
            prefix = self.prefix + other.prefix
        return OffsetTable(grid=self.grid + other.grid, prefix=prefix)


@dataclass(frozen=True)
class Offsets:
    """Where the table is read for every (query, key) pair of patch tokens: flat indices
    [B, M, M, k] with k = 1 at whole offsets, or k = 4 with bilinear weights [B, M, M, 4]."""

    index: Tensor
    weight: Tensor | None

    @staticmethod
    def of(positions: Tensor, grid: tuple[int, int]) -> Offsets:
        """The offsets between the patch tokens' positions [B, M, 2] on a grid of (H, W) patches."""
        h, w = grid
        diff = positions.unsqueeze(2) - positions.unsqueeze(1)  # query minus key, [B, M, M, 2]
        row, col = diff[..., 0] + (h - 1), diff[..., 1] + (w - 1)
        # whole offsets: one entry each (the interpolation below gives the same values, with four reads; under
        # torch.compile it is always taken, as the test would depend on the data)
        if not torch.compiler.is_compiling() and bool((diff == diff.round()).all()):
            return Offsets(index=(row.long() * (2 * w - 1) + col.long()).unsqueeze(-1), weight=None)
        r0, c0 = row.floor().clamp(0, 2 * h - 2), col.floor().clamp(0, 2 * w - 2)
        fr, fc = row - r0, col - c0
        r1, c1 = (r0 + 1).clamp(max=2 * h - 2), (c0 + 1).clamp(max=2 * w - 2)
        index = torch.stack([r * (2 * w - 1) + c for r in (r0, r1) for c in (c0, c1)], dim=-1).long()
        weight = torch.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], dim=-1)
        return Offsets(index=index, weight=weight)

    def read(self, table: OffsetTable, num_prefix: int) -> Tensor:
        """The bias [B, heads, N, N] of the tokens (prefix first) whose offsets these are."""
        flat = table.grid.flatten(0, 1)  # [(2H-1)(2W-1), heads]
        if self.weight is None:
            bias = flat[self.index[..., 0]]
        else:
            bias = sum(flat[self.index[..., i]] * self.weight[..., i, None].to(flat.dtype) for i in range(4))
        bias = bias.permute(0, 3, 1, 2)
        if not num_prefix:
            return bias
        bias = F.pad(bias, [num_prefix, 0, num_prefix, 0])
        if table.prefix is not None:
            heads = table.prefix.T[None, :, :, None]  # [1, heads, 3, 1]
            bias[:, :, :num_prefix, num_prefix:] = heads[:, :, 0:1]
            bias[:, :, num_prefix:, :num_prefix] = heads[:, :, 1:2]
            bias[:, :, :num_prefix, :num_prefix] = heads[:, :, 2:3]
        return bias


def grid_positions(grid: tuple[int, int], device=None) -> Tensor:
    """[H*W, 2] the (row, column) of every patch, in token order."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2).float()


@dataclass
class _RelPosPass:
    """What one pass's blocks need besides the tokens: its state (positions), the shared bias and
    the offsets of the positions the tokens hold now."""

    model: nn.Module
    batch: int
    state: ReductionState | None = None
    _shared: OffsetTable | None = field(default=None, repr=False)
    _offsets: tuple[Tensor, Offsets] | None = field(default=None, repr=False)

    def shared_module(self) -> nn.Module | None:
        return getattr(self.model, "rel_pos_bias", None) or getattr(self.model, "shared_rel_pos", None)

    def shared(self) -> OffsetTable | None:
        """The shared bias table, evaluated once per pass."""
        module = self.shared_module()
        if module is not None and self._shared is None:
            self._shared = OffsetTable.of(module)
        return self._shared

    def offsets(self, batch_one: bool) -> Offsets:
        """The offsets of the tokens now (of one sample's grid, while no token has moved)."""
        positions = self.state.positions[:1] if batch_one else self.state.positions
        if self._offsets is None or self._offsets[0] is not positions:
            grid = tuple(self.model.patch_embed.grid_size)
            self._offsets = (positions, Offsets.of(positions[:, self.state.num_prefix:], grid))
        return self._offsets[1]

    def shared_timm_bias(self) -> Tensor | None:
        """The shared bias as timm's blocks take it, [1, heads, N, N] on the full grid."""
        shared = self.shared()
        return None if shared is None else self.offsets(batch_one=True).read(shared, self.state.num_prefix)


# --- one block -------------------------------------------------------------------------------------
class RelPosBlockOps(TimmBlockOps):
    """The steps of a BEiT or relative-position ViT block, with the bias of the tokens' positions."""

    def __init__(self, block: nn.Module, extra: _RelPosPass, checkpointing: bool = False):
        super().__init__(block, checkpointing, pre_norm=not isinstance(block, ResPostRelPosBlock))
        self.extra, self.model = extra, extra.model
        self._bias: tuple[Tensor, Tensor | None] | None = None

    def rel_bias(self) -> Tensor | None:
        """[B or 1, heads, N, N] this block's relative bias at the positions the tokens hold now."""
        state = self.extra.state
        if self._bias is not None and self._bias[0] is state.positions:
            return self._bias[1]
        tables = [self.extra.shared() if s is self.extra.shared_module() else OffsetTable.of(s)
                  for s in bias_sources(self.model, self.block)]
        bias = None
        if tables:
            table = sum(tables[1:], tables[0])
            bias = self.extra.offsets(batch_one=not state.positions_moved).read(table, state.num_prefix)
        self._bias = (state.positions, bias)
        return bias

    def _branch_kwargs(self) -> dict:
        return {"rel_bias": self.rel_bias()}

    def _attention_branch(self, h: Tensor, bias: Tensor | None, needs: frozenset[str],
                          rel_bias: Tensor | None = None) -> tuple[Tensor, Signals]:
        return attention_forward(self.block.attn, h, _add(rel_bias, bias), needs)

    def attn_logits(self, q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        return super().attn_logits(q, k, _add(self.rel_bias(), bias))

    def plain(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.extra.state.positions_moved or bias is not None:
            return self.mlp(self.attention(x, bias, frozenset())[0])
        shared = self.extra.shared_timm_bias()
        key = "shared_rel_pos_bias" if isinstance(self.model, Beit) else "shared_rel_pos"
        return self._run(lambda t: self.block(t, **{key: shared}), x)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


# --- the patched model -------------------------------------------------------------------------------
class _ReducedRelPos(ReducedViT):
    """timm_vit's patched methods with these models' embedding, blocks, positions and head."""

    def _tr_embed(self, x: Tensor) -> tuple[Tensor, _RelPosPass]:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if getattr(self, "pos_embed", None) is not None:  # BEiT's optional absolute positions
            x = x + self.pos_embed
        if hasattr(self, "pos_drop"):
            x = self.pos_drop(x)
        return x, _RelPosPass(model=self, batch=x.shape[0])

    def _tr_start(self, state: ReductionState, extra: _RelPosPass) -> None:
        extra.state = state
        positions = grid_positions(tuple(self.patch_embed.grid_size), device=self.patch_embed.proj.weight.device)
        state.place(positions, extra.batch, self._tokenreduce.options["merged_position"])

    def _tr_block_ops(self, block: nn.Module, state: ReductionState, extra: _RelPosPass, checkpointing: bool):
        return RelPosBlockOps(block, extra, checkpointing)

    def _tr_pool_includes_prefix(self) -> bool:
        return False

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        sizes = self._tokenreduce.sizes_for(x)
        if sizes is None or self.global_pool != "avg":
            return self._tokenreduce.original_class.forward_head(self, x, pre_logits)
        prefix = self.num_prefix_tokens
        x = size_weighted_mean(x[:, prefix:], sizes[:, prefix:])
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


def relpos_mlp_macs(model: nn.Module, blocks: int) -> int:
    """MACs of evaluating the MLP biases of the first `blocks` blocks (and a shared one) on the
    offset grid: once per pass, whatever the batch, so counted in full for one image."""
    modules = {id(m): m for blk in model.blocks[:blocks] for m in bias_sources(model, blk) if isinstance(m, RelPosMlp)}
    return sum(len(m.rel_coords_log.flatten(0, 1)) * linear_macs(m.mlp) for m in modules.values())


@register_adapter("timm_relpos")
class TimmRelPosAdapter(TimmViTAdapter):  # ViT's cost model, and the bias MLPs
    family = "timm relative-position-bias ViTs (BEiT, BEiT v2, vit_relpos, vit_srelpos)"
    reduced_methods = _ReducedRelPos
    options = {"merged_position": POSITION_RULES}  # see ReductionState.place and carry_positions

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, (Beit, VisionTransformerRelPos))

    def describe(self, model: nn.Module) -> ModelInfo:
        return describe(model)

    def pass_macs(self, model: nn.Module, state: ReductionState) -> dict[str, int]:
        macs = super().pass_macs(model, state)
        mlp = relpos_mlp_macs(model, len(state.records))
        return {**macs, "blocks": macs["blocks"] + mlp, "total": macs["total"] + mlp}
