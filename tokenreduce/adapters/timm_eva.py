"""Placing a reducer into timm's `Eva` family (timm 1.x): EVA, EVA-02, the RoPE ViTs (Naver's
RoPE-Axial, timm's SBB RoPE ViTs), Perception Encoder and DINOv3.

Eva is built like VisionTransformer, so the model loop, pooling and cost are timm_vit's; what
differs is handled here:
- Rotary position embeddings (RoPE) rotate queries and keys by each token's grid position inside
  the attention, so positions must follow the tokens. The pass's state carries one position per
  token (`ReductionState.positions`, in the RoPE grid's own units: patch indices for
  `RotaryEmbeddingCat`, DINOv3's centred coordinates in [-1, 1] for `RotaryEmbeddingDinoV3`)
  through every merge and pruning step; a merged token gets its destination's position, or with
  `adapter_options={"merged_position": "mean"}` the size-weighted mean of its members' positions.
  Until the first reduction the blocks use timm's own embedding, so nothing changes there.
- LayerScale is `gamma_1`/`gamma_2`; q/k/v come from a fused qkv with separate q/v biases
  (EvaAttention) or its own bias (AttentionRope), or from separate projections.
- Average pooling leaves the prefix tokens out, attention pooling ("map") includes them.

The KEYS signal is the keys before the rotation: a metric of content, so that two equal patches
far apart still look alike (their positions are carried separately).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import AttentionPoolLatent, AttentionRope, apply_rot_embed_cat
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3, _build_grid, _rope_layout
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import Tensor, nn

from tokenreduce.adapters.base import ModelInfo, register_adapter
from tokenreduce.adapters.timm_vit import (
    POOLS,
    ReducedViT,
    TimmBlockOps,
    TimmViTAdapter,
    attend,
    model_name,
    project,
)
from tokenreduce.core.contract import Signals
from tokenreduce.core.merge import POSITION_RULES
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import UnsupportedModelError

# the RoPE modules whose angles the adapter computes at any position
ROPES = (RotaryEmbeddingCat, RotaryEmbeddingDinoV3)
MODEL_PARTS = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "num_prefix_tokens", "rope")


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not."""
    name = model_name(model)
    if not isinstance(model, Eva):
        raise UnsupportedModelError(f"model {name} ({type(model).__name__}) is not a timm Eva")
    for part in MODEL_PARTS:
        if not hasattr(model, part):
            raise UnsupportedModelError(f"model {name} has no {part!r}, which the timm Eva adapter needs")
    rope = model.rope
    if rope is not None and type(rope) not in ROPES:
        raise UnsupportedModelError(
            f"model {name} ({type(model).__name__}) uses RoPE {type(rope).__name__}; supported: timm's "
            "RotaryEmbeddingCat (EVA-02, RoPE-Axial, PE), RotaryEmbeddingDinoV3 (DINOv3) or none: a merged token "
            "needs its RoPE angles at a new position, which the adapter computes for these only")
    if rope is not None and rope.aug_active:
        raise UnsupportedModelError(
            f"model {name} augments its RoPE coordinates in training (rope_shift/jitter/rescale_coords); supported: "
            "none, as the random transform is not carried to merged tokens")
    if getattr(model, "patch_drop", None) is not None:
        raise UnsupportedModelError(f"model {name} uses patch dropout (patch_drop_rate > 0); supported: 0, as the "
                                    "kept patches' RoPE positions are not passed on")
    pool = model.global_pool
    if pool not in POOLS or (pool == "map" and not isinstance(model.attn_pool, AttentionPoolLatent)):
        raise UnsupportedModelError(
            f"model {name} pools with global_pool={pool!r}; supported: {', '.join(repr(p) for p in POOLS)}")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (EvaBlock, EvaBlockPostNorm):
            raise UnsupportedModelError(
                f"model {name} block {i} is {type(blk).__name__}; supported blocks: EvaBlock, EvaBlockPostNorm")
        if type(blk.attn) not in (EvaAttention, AttentionRope):
            raise UnsupportedModelError(f"model {name} block {i} uses attention {type(blk.attn).__name__}; "
                                        "supported: EvaAttention, AttentionRope")
        if getattr(blk.attn, "num_kv_groups", 1) != 1:
            raise UnsupportedModelError(f"model {name} block {i} uses grouped-query attention (num_kv_heads); "
                                        "supported: one key/value head per query head")
    attn = model.blocks[0].attn
    return ModelInfo(
        name=name,
        depth=len(model.blocks),
        num_prefix=model.num_prefix_tokens,
        has_class_token=model.cls_token is not None,
        embed_dim=model.embed_dim,
        num_heads=attn.num_heads,
    )


# --- RoPE at any position ------------------------------------------------------------------------
def grid_coords(rope: RotaryEmbeddingCat | RotaryEmbeddingDinoV3, grid: tuple[int, int], device=None) -> Tensor:
    """[H*W, 2] the coordinates timm's RoPE gives the patch grid, in token order (timm's own private
    helpers, here and in `rope_embed`, so that grid coordinates give its embedding bit for bit)."""
    if isinstance(rope, RotaryEmbeddingDinoV3):  # patch centres mapped to [-1, 1], built on the CPU as timm does
        coords = _build_grid(list(grid), grid_type="centered", grid_offset=rope.grid_offset,
                             grid_indexing=rope.grid_indexing, normalize_coords=rope.normalize_coords)
        return coords.reshape(-1, coords.shape[-1]).to(device)
    coords = _build_grid(list(grid), grid_type=rope.grid_type, ref_feat_shape=rope.ref_feat_shape,
                         grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                         normalize_coords=rope.normalize_coords, device=device)
    return coords.reshape(-1, coords.shape[-1])


def rope_embed(rope: RotaryEmbeddingCat | RotaryEmbeddingDinoV3, coords: Tensor, dtype: torch.dtype) -> Tensor:
    """The embedding [..., N, 2 * dim] (sin then cos) at coordinates [..., N, 2], computed as timm
    computes it on its grid, so grid coordinates give timm's embedding exactly."""
    if isinstance(rope, RotaryEmbeddingDinoV3):  # a period per frequency, kept in float32 or wider
        angles = 2 * math.pi * coords.to(rope.periods).unsqueeze(-1) / rope.periods
    else:
        angles = coords.unsqueeze(-1) * rope.bands
    sin = _rope_layout(angles.sin().to(dtype).flatten(-2), rope.rotate_half)
    cos = _rope_layout(angles.cos().to(dtype).flatten(-2), rope.rotate_half)
    return torch.cat([sin, cos], dim=-1)


@dataclass
class _EvaPass:
    """What one pass's blocks need besides the tokens: timm's RoPE embedding of the full grid and,
    once `start` has put positions into the pass's state, the embedding of the ones it holds now."""

    batch: int
    grid: tuple[int, int]
    grid_embed: Tensor | None  # None without RoPE
    rope: RotaryEmbeddingCat | RotaryEmbeddingDinoV3 | None = None
    state: ReductionState | None = None
    _cached: tuple[Tensor, Tensor] | None = None

    def start(self, state: ReductionState, rope: RotaryEmbeddingCat | RotaryEmbeddingDinoV3 | None, rule: str) -> None:
        """Give every token of `state` its grid position (prefix tokens, never rotated, get 0)."""
        self.state, self.rope = state, rope
        if self.grid_embed is not None:  # without RoPE, positions were added to the tokens before block 0
            state.place(grid_coords(rope, self.grid, device=self.grid_embed.device), self.batch, rule)

    def rope_now(self) -> Tensor | None:
        if self.state is None or not self.state.positions_moved:  # timm's own embedding
            return self.grid_embed
        positions = self.state.positions
        if self._cached is None or self._cached[0] is not positions:
            prefix = self.state.num_prefix
            embed = rope_embed(self.rope, positions[:, prefix:], self.grid_embed.dtype).unsqueeze(1)  # [B, 1, N, 2d]
            self._cached = (positions, embed)
        return self._cached[1]


# --- one block -------------------------------------------------------------------------------------
class EvaBlockOps(TimmBlockOps):
    """The steps of an `EvaBlock` (pre-norm) or `EvaBlockPostNorm` for a reducer; `rope` gives the
    RoPE embedding of the tokens the block holds when it is called (None without RoPE)."""

    def __init__(self, block: nn.Module, rope: Callable[[], Tensor | None], checkpointing: bool = False):
        super().__init__(block, checkpointing, pre_norm=isinstance(block, EvaBlock))
        self.rope = rope

    def _branch_kwargs(self) -> dict:
        return {"rope": self.rope()}

    def _rotate(self, t: Tensor, rope: Tensor | None) -> Tensor:
        """Queries or keys [B, H, N, head_dim] rotated by the RoPE embedding (prefix tokens are not)."""
        if rope is None:
            return t
        attn, prefix = self.block.attn, self.block.attn.num_prefix_tokens
        rotated = apply_rot_embed_cat(t[:, :, prefix:], rope, half=attn.rotate_half)
        return torch.cat([t[:, :, :prefix], rotated], dim=2).type_as(t)

    def _attention_branch(self, h: Tensor, bias: Tensor | None, needs: frozenset[str],
                          rope: Tensor | None = None) -> tuple[Tensor, Signals]:
        attn = self.block.attn
        q, k, v = project(attn, h, (0, 1, 2))
        q, k = attn.q_norm(q), attn.k_norm(k)
        return attend(attn, h, self._rotate(q, rope), self._rotate(k, rope), v, bias, needs, keys=k)

    def attn_qk(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys [B, H, N, head_dim], normed and rotated, from the q and k rows only."""
        rope = self.rope()
        return tuple(self._rotate(t, rope) for t in super().attn_qk(h))


# --- the patched model -------------------------------------------------------------------------------
class _ReducedEva(ReducedViT):
    """timm_vit's patched methods with Eva's embedding, blocks and RoPE positions."""

    def _tr_embed(self, x: Tensor) -> tuple[Tensor, _EvaPass]:
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x, rope = self._pos_embed(x)
        return self.norm_pre(x), _EvaPass(batch=x.shape[0], grid=grid, grid_embed=rope)

    def _tr_start(self, state: ReductionState, extra: _EvaPass) -> None:
        extra.start(state, self.rope, self._tokenreduce.options["merged_position"])

    def _tr_block_ops(self, block: nn.Module, state: ReductionState, extra: _EvaPass, checkpointing: bool):
        return EvaBlockOps(block, extra.rope_now, checkpointing)

    def _tr_pool_includes_prefix(self) -> bool:
        return self.attn_pool is not None  # timm's Eva.pool: attention pooling sees every token


@register_adapter("timm_eva")
class TimmEvaAdapter(TimmViTAdapter):  # ViT's cost model
    family = "timm Eva (EVA, EVA-02, RoPE ViTs, Perception Encoder, DINOv3)"
    reduced_methods = _ReducedEva
    options = {"merged_position": POSITION_RULES}  # see ReductionState.place and carry_positions

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def describe(self, model: nn.Module) -> ModelInfo:
        return describe(model)
