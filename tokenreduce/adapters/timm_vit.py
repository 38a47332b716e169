"""Placing a reducer into timm's `VisionTransformer` family (timm 1.x).

The patched model keeps timm's own modules and weights. Only the model-level loop is replaced:
embedding, then each block either unchanged (called as timm defines it) or through its reducer,
then the final norm and a head that pools by token size. Blocks that reduce call the block's own
submodules through `TimmBlockOps`, so LayerScale, q/k norm, drop path and fused attention behave
exactly as in timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tokenreduce.adapters.base import Adapter, register_adapter
from tokenreduce.adapters.blocks import run_blocks, size_weighted_mean
from tokenreduce.core.attention import attention
from tokenreduce.core.contract import ATTN, KEYS, ModelInfo, Signals
from tokenreduce.core.macs import BlockCost, linear_macs, macs_parts
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnsupportedModelError

PRE_NORM_BLOCKS = (Block,)
POST_NORM_BLOCKS = (ResPostBlock,)
POOLS = ("", "token", "avg", "max", "avgmax", "map")
MODEL_PARTS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "num_prefix_tokens")
ATTENTION_PARTS = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads", "head_dim")


def model_name(model: nn.Module) -> str:
    """timm's `architecture.tag` (e.g. `vit_base_patch16_224.mae`): the tag tells the weights' family."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or type(model).__name__
    return f"{name}.{cfg['tag']}" if cfg.get("tag") else name


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not."""
    name = model_name(model)
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"model {name} ({type(model).__name__}) is not a timm VisionTransformer; "
            "supported: timm.models.vision_transformer.VisionTransformer and its subclasses (ViT, DeiT)"
        )
    for part in MODEL_PARTS:
        if not hasattr(model, part):
            raise UnsupportedModelError(f"model {name} has no {part!r}, which the timm ViT adapter needs")
    pool = getattr(model, "global_pool", "")
    if pool not in POOLS or (pool == "map" and not isinstance(model.attn_pool, AttentionPoolLatent)):
        raise UnsupportedModelError(
            f"model {name} pools with global_pool={pool!r}; supported: {', '.join(repr(p) for p in POOLS)}"
        )
    for i, blk in enumerate(model.blocks):
        if type(blk) not in PRE_NORM_BLOCKS + POST_NORM_BLOCKS:
            raise UnsupportedModelError(
                f"model {name} block {i} is {type(blk).__name__}; supported blocks: Block, ResPostBlock"
            )
        if type(blk.attn) is not Attention or any(not hasattr(blk.attn, p) for p in ATTENTION_PARTS):
            raise UnsupportedModelError(
                f"model {name} block {i} uses attention {type(blk.attn).__name__}; supported: timm.layers.Attention"
            )
    attn = model.blocks[0].attn
    return ModelInfo(
        name=name,
        depth=len(model.blocks),
        num_prefix=model.num_prefix_tokens,
        has_class_token=getattr(model, "cls_token", None) is not None,
        embed_dim=model.embed_dim,
        num_heads=attn.num_heads,
    )


# --- one block -------------------------------------------------------------------------------
def project(attn: nn.Module, h: Tensor, parts: tuple[int, ...]) -> list[Tensor]:
    """The projections [B, H, N, head_dim] among q (0), k (1), v (2) that `parts` names, as timm's
    attentions compute them: a fused qkv with its own bias or separate q/k/v biases (EVA, BEiT), or
    separate projections; a contiguous run of parts of a fused qkv is one matrix product."""
    b, n, _ = h.shape
    if getattr(attn, "qkv", None) is None:
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        return [projs[p](h).reshape(b, n, attn.num_heads, -1).transpose(1, 2) for p in parts]
    dim = attn.qkv.weight.shape[0] // 3
    rows = slice(parts[0] * dim, (parts[-1] + 1) * dim)
    if getattr(attn, "q_bias", None) is not None:  # q and v biases, k none (k_bias is zeros)
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))[rows]
    else:
        bias = None if attn.qkv.bias is None else attn.qkv.bias[rows]
    if getattr(attn, "qkv_bias_separate", False) and bias is not None:
        out = F.linear(h, attn.qkv.weight[rows]) + bias
    else:
        out = F.linear(h, attn.qkv.weight[rows], bias)
    return list(out.reshape(b, n, len(parts), attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0))


def _norm(attn: nn.Module, name: str, t: Tensor) -> Tensor:
    """The attention's q or k norm of `t`, where it has one."""
    norm = getattr(attn, name, None)
    return t if norm is None else norm(t)


def attention_forward(attn: Attention, x: Tensor, bias: Tensor | None, needs: frozenset[str]) -> tuple[Tensor, Signals]:
    """timm's `Attention.forward`, also returning the signals asked for.

    Keeps the fused kernel unless the attention probabilities are needed.
    """
    q, k, v = project(attn, x, (0, 1, 2))
    return attend(attn, x, _norm(attn, "q_norm", q), _norm(attn, "k_norm", k), v, bias, needs)


def attend(attn: nn.Module, x: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, needs: frozenset[str],
           keys: Tensor | None = None) -> tuple[Tensor, Signals]:
    """The rest of a timm attention from its queries, keys and values [B, H, N, head_dim]: the
    (fused unless probabilities are asked for) product, the output norm, gate and projection.

    x: the attention input (for a gated attention); keys: the keys reported as the KEYS signal when
    they are not `k` itself (RoPE models report the keys before the rotation).
    """
    signals = Signals()
    if ATTN in needs or not attn.fused_attn:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        if ATTN in needs:
            signals.attn = probs
        out = attn.attn_drop(probs) @ v
    else:
        drop = attn.attn_drop.p if attn.training else 0.0
        out = attention(q, k, v, bias, drop)  # the per-key log-size bias by the device's kernel
    if KEYS in needs:
        signals.keys = (k if keys is None else keys).mean(dim=1)
    return _attn_out(attn, out, x), signals


def _attn_out(attn: nn.Module, out: Tensor, x: Tensor) -> Tensor:
    """[B, H, N, head_dim] heads -> [B, N, C] through the output norm, the gate of `x` and the projection."""
    b, n, _ = x.shape
    out = out.transpose(1, 2).reshape(b, n, -1)
    if getattr(attn, "norm", None) is not None:  # a sub-norm (EVA-02, scale_norm); BEiT has none
        out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


class TimmBlockOps:
    """The steps of a timm `Block` (pre-norm) or `ResPostBlock` (post-norm) for a reducer.

    Blocks of other timm families with the same layout (Eva, BEiT, the relative-position ViTs) work
    through it as they are: LayerScale as `ls1`/`ls2` or `gamma_1`/`gamma_2`, attentions whose q, k,
    v `project` computes, q/k norms where present. A family subclasses it to override the hooks
    `_branch_kwargs` (extra block arguments), `_attention_branch` and `attn_logits`.
    """

    def __init__(self, block: nn.Module, checkpointing: bool = False, pre_norm: bool | None = None):
        self.block = block
        self.pre_norm = isinstance(block, PRE_NORM_BLOCKS) if pre_norm is None else pre_norm
        self.checkpointing = checkpointing

    def _run(self, fn, *args):
        if self.checkpointing:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # --- hooks ---------------------------------------------------------------------------------
    def _branch_kwargs(self) -> dict:
        """Arguments the block's own forward and `_attention_branch` need besides the tokens and the
        mask; taken once per step, outside the checkpointed function, so a recomputation in the
        backward pass sees the same ones."""
        return {}

    def _scale(self, y: Tensor, which: int) -> Tensor:
        """LayerScale `which` (1: attention, 2: MLP) of a pre-norm block: a module or a gamma vector."""
        ls = getattr(self.block, f"ls{which}", None)
        if ls is not None:
            return ls(y)
        gamma = getattr(self.block, f"gamma_{which}", None)
        return y if gamma is None else gamma * y

    def _attention_branch(self, h: Tensor, bias: Tensor | None, needs: frozenset[str]) -> tuple[Tensor, Signals]:
        """attn(h) with the signals asked for (and the `_branch_kwargs` as keywords)."""
        return attention_forward(self.block.attn, h, bias, needs)

    # --- the steps -----------------------------------------------------------------------------
    def plain(self, x: Tensor, bias: Tensor | None) -> Tensor:
        kwargs = self._branch_kwargs()
        return self._run(lambda t, m: self.block(t, attn_mask=m, **kwargs), x, bias)

    def attention(self, x: Tensor, bias: Tensor | None, needs: frozenset[str]) -> tuple[Tensor, Signals]:
        kwargs = self._branch_kwargs()

        def step(t, m):
            y, sig = self._attention_branch(self.attn_input(t), m, needs, **kwargs)
            return self.attn_residual(t, y), sig.keys, sig.attn

        x, keys, attn = self._run(step, x, bias)
        return x, Signals(keys=keys, attn=attn)

    def mlp(self, x: Tensor) -> Tensor:
        blk = self.block
        if self.pre_norm:
            return self._run(lambda t: t + blk.drop_path2(self._scale(blk.mlp(blk.norm2(t)), 2)), x)
        return self._run(lambda t: t + blk.drop_path2(blk.norm2(blk.mlp(t))), x)

    # --- finer steps: the attention residual in pieces ---------------------------------------
    # For reducers that act inside the attention step (MCTF's one-step-ahead attention reuses a
    # merged probability map, DynamicViT masks the softmax). In this order
    #     h = attn_input(x); q, k = attn_qk(h); p = attn_logits(q, k, bias).softmax(-1)
    #     y = attn_output(p, attn_values(h), h); x = attn_residual(x, y)
    # they compute what `attention` computes with the attention probabilities asked for.
    @property
    def training(self) -> bool:
        """Whether the block runs in training mode (set by the model's train()/eval())."""
        return self.block.training

    def attn_input(self, x: Tensor) -> Tensor:
        """What the attention reads: norm1(x) in a pre-norm block, x itself in a post-norm one."""
        return self.block.norm1(x) if self.pre_norm else x

    def attn_qk(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys [B, H, N, head_dim] (q/k norms applied), from the q and k rows only."""
        attn = self.block.attn
        q, k = project(attn, h, (0, 1))
        return _norm(attn, "q_norm", q), _norm(attn, "k_norm", k)

    def attn_values(self, h: Tensor) -> Tensor:
        """Values [B, H, N, head_dim], from the v rows only."""
        return project(self.block.attn, h, (2,))[0]

    def attn_logits(self, q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        """Attention logits [B, H, N, N] before the softmax, with the additive bias (log size)."""
        logits = (q * self.block.attn.scale) @ k.transpose(-2, -1)
        return logits if bias is None else logits + bias

    def attn_output(self, probs: Tensor, v: Tensor, h: Tensor) -> Tensor:
        """The attention's output [B, N, C] from probabilities [B, H, N, N] and values; `h` is the
        attention input of the same tokens (for a gated attention)."""
        return _attn_out(self.block.attn, self.block.attn.attn_drop(probs) @ v, h)

    def attn_residual(self, x: Tensor, y: Tensor) -> Tensor:
        """x + the attention branch `y` through LayerScale and drop path (post-norm: through norm1)."""
        blk = self.block
        if self.pre_norm:
            return x + blk.drop_path1(self._scale(y, 1))
        return x + blk.drop_path1(blk.norm1(y))


# --- the patched model -----------------------------------------------------------------------
def _refuse_masks(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ConfigError(
            "attn_mask/is_causal are not supported on a token-reduced model: merged tokens no longer "
            "line up with a mask over the input tokens; call tokenreduce.remove(model) first"
        )


def _embed(model: VisionTransformer, x: Tensor) -> Tensor:
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def weighted_pool(model: nn.Module, x: Tensor, sizes: Tensor, pool_type: str | None, padded: bool = False) -> Tensor:
    """Pooling by token size: the size-weighted mean (avg, avgmax), or attention pooling with the
    proportional-attention bias. With `padded`, tokens of size 0 are padding and take no part."""
    pool_type = model.global_pool if pool_type is None else pool_type
    if not model._tr_pool_includes_prefix():
        x, sizes = x[:, model.num_prefix_tokens :], sizes[:, model.num_prefix_tokens :]
    if model.attn_pool is not None:
        if model.token_reducer.prop_attn:
            keys = sizes.log().clamp_min(torch.finfo(x.dtype).min)  # log 0 (padding) as the dtype's floor
        else:
            keys = torch.where(sizes > 0, 0.0, torch.finfo(x.dtype).min) if padded else None
        return model.attn_pool(x, attn_mask=None if keys is None else keys.to(x.dtype).transpose(1, 2).unsqueeze(1))
    avg = size_weighted_mean(x, sizes)
    if pool_type == "avg":
        return avg
    return 0.5 * ((x.masked_fill(sizes == 0, torch.finfo(x.dtype).min) if padded else x).amax(dim=1) + avg)


class ReducedViT:
    """Methods placed in front of the model's own class by `patch`.

    Another timm family built like VisionTransformer (Eva) subclasses it and overrides the `_tr_*` hooks.
    """

    # --- hooks ---------------------------------------------------------------------------------
    def _tr_embed(self, x: Tensor) -> tuple[Tensor, object]:
        """The tokens entering block 0, and what the blocks need besides them (None here)."""
        return _embed(self, x), None

    def _tr_start(self, state: ReductionState, extra) -> None:
        """Prepare the pass's state (nothing for a ViT: its positions were added to the tokens)."""

    def _tr_block_ops(self, block: nn.Module, state: ReductionState, extra, checkpointing: bool) -> TimmBlockOps:
        return TimmBlockOps(block, checkpointing)

    def _tr_pool_includes_prefix(self) -> bool:
        return self.pool_include_prefix

    # --- timm's methods, with reduction --------------------------------------------------------
    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _refuse_masks(attn_mask, is_causal)
        x, state, _ = run_blocks(self, *self._tr_embed(x))
        self._tokenreduce.last_state = state
        return self.norm(x)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        sizes = self._tokenreduce.sizes_for(x)
        pool_type = self.global_pool if pool_type is None else pool_type
        if sizes is None or (self.attn_pool is None and pool_type in ("", "token", "max")):
            return self._tokenreduce.original_class.pool(self, x, pool_type)
        return weighted_pool(self, x, sizes, pool_type)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ):
        """timm's `forward_intermediates` with reduction; intermediates may have fewer tokens.

        With output_fmt="NCHW" every taken layer must still hold the full grid of patch tokens.
        """
        _refuse_masks(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ConfigError(f"output_fmt={output_fmt!r} is invalid; allowed: 'NCHW', 'NLC'")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x, extra = self._tr_embed(x)
        num_prefix = self.num_prefix_tokens
        if output_fmt == "NCHW":
            removals = self.token_reducer.removal_counts(len(self.blocks), x.shape[1] - num_prefix)
            if any(removals[: max(take) + 1]):
                raise ConfigError(
                    f"output_fmt='NCHW' needs the full patch grid, but this reducer removes tokens at or before "
                    f"layer {max(take)}; allowed: output_fmt='NLC' for token-reduced intermediates"
                )
        x, state, intermediates = run_blocks(self, x, extra, set(take), max_index if stop_early else None)
        self._tokenreduce.last_state = state
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        prefix = [y[:, :num_prefix] for y in intermediates] if num_prefix else None
        intermediates = [y[:, num_prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


_ReducedViT = ReducedViT  # the name families written against earlier releases subclass


# --- cost --------------------------------------------------------------------------------------
def block_costs(model: nn.Module) -> list[BlockCost]:
    costs = []
    for blk in model.blocks:
        attn = blk.attn
        attn_dim = attn.qkv.out_features // 3 if getattr(attn, "qkv", None) is not None else attn.q_proj.out_features
        rel_pos = getattr(attn, "rel_pos", None)  # a relative-position MLP runs on offsets, not tokens
        attn_linear = linear_macs(attn) - (linear_macs(rel_pos) if rel_pos is not None else 0)
        costs.append(BlockCost(attn_linear=attn_linear, attn_dim=attn_dim, mlp_linear=linear_macs(blk.mlp),
                               qk_linear=2 * model.embed_dim * attn_dim))
    return costs


def _pool_and_head_macs(model: nn.Module, final_tokens: int) -> int:
    heads = [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None)) if m is not None]
    head = sum(linear_macs(m) for m in heads)
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        return head
    tokens = final_tokens if model._tr_pool_includes_prefix() else final_tokens - model.num_prefix_tokens
    latent = pool.latent_len
    attn_dim = pool.num_heads * pool.head_dim
    macs = latent * linear_macs(pool.q) + tokens * linear_macs(pool.kv) + 2 * latent * tokens * attn_dim
    macs += latent * linear_macs(pool.proj) + latent * (linear_macs(pool.mlp) if pool.mlp is not None else 0)
    return macs + head * (1 if pool.pool in ("token", "avg") else latent)


def pass_macs(model: nn.Module, state: ReductionState) -> dict[str, int]:
    """MACs of one image for the pass that left `state`, split by where they are spent."""
    num_patches = state.records[0].tokens_in - model.num_prefix_tokens
    proj = (model.patch_embed if hasattr(model, "patch_embed") else model.embeds).proj  # NaFlexViT: embeds
    # a convolution with stride == kernel, or a linear layer of flattened patches: weights per patch
    embed = num_patches * proj.weight.numel() if isinstance(proj, (nn.Conv2d, nn.Linear)) else 0
    return macs_parts(embed, block_costs(model), state.records, _pool_and_head_macs(model, state.final_tokens))


@register_adapter("timm_vit")
class TimmViTAdapter(Adapter):
    family = "timm VisionTransformer (ViT, DeiT, ViT with registers)"
    reduced_methods = ReducedViT

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def describe(self, model: nn.Module) -> ModelInfo:
        return describe(model)

    def pass_macs(self, model: nn.Module, state: ReductionState) -> dict[str, int]:
        return pass_macs(model, state)
