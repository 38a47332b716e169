"""Placing a reducer into timm's NaFlexViT (`naflexvit_*`): images of different sizes and aspect
ratios in one batch, as patch sequences padded to one length with a validity mask.

Standard image input ([B, C, H, W]) runs as in the ViT adapter. A padded NaFlex batch (a dict from
timm's `NaFlexCollator`, or patches with `patch_coord` and `patch_valid`) is split by each image's
number of real patches; each group runs through the blocks without its padding, so padding never
enters attention, never merges with a real token, and never counts in sizes or MACs, and every
image removes what its own real-token count sets (a keep ratio of its own patches). Padding is not
even embedded. The images' tokens are then put back into one batch:

    [B, prefix + the most real tokens any image has left, C]

each image's tokens first, zeros after; the returned `patch_valid` marks the real ones, and their
sizes are 0 in `stats(model)`. Without padding (every patch valid) the batch runs whole.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from tokenreduce.adapters.base import ModelInfo, register_adapter
from tokenreduce.adapters.timm_vit import (
    POOLS,
    ReducedViT,
    TimmViTAdapter,
    model_name,
    run_blocks,
    weighted_pool,
)
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnsupportedModelError


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not."""
    name = model_name(model)
    if not isinstance(model, NaFlexVit):
        raise UnsupportedModelError(f"model {name} ({type(model).__name__}) is not a timm NaFlexVit")
    if model.rope is not None:
        raise UnsupportedModelError(
            f"model {name} uses rotary embeddings (rope_type); supported: NaFlexViT with absolute positions, as "
            "every registered naflexvit_* model has (a RoPE NaFlexViT needs each image's own grid carried through "
            "merges); for RoPE use an Eva model")
    if model.patch_drop is not None:
        raise UnsupportedModelError(f"model {name} uses patch dropout (patch_drop_rate > 0); supported: 0")
    if model.global_pool not in POOLS:
        raise UnsupportedModelError(f"model {name} pools with global_pool={model.global_pool!r}; supported: "
                                    f"{', '.join(map(repr, POOLS))}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise UnsupportedModelError(f"model {name} block {i} is {type(blk).__name__} with "
                                        f"{type(blk.attn).__name__}; supported: timm Block with Attention")
    return ModelInfo(name=name, depth=len(model.blocks), num_prefix=model.num_prefix_tokens,
                     has_class_token=model.has_class_token, embed_dim=model.embed_dim,
                     num_heads=model.blocks[0].attn.num_heads)


def real_counts(patch_valid: Tensor) -> Tensor:
    """[B] each image's real patches; padding must follow them, as timm's NaFlexCollator puts it."""
    valid = patch_valid.bool()
    counts = valid.sum(dim=1)
    if not torch.equal(valid, torch.arange(valid.shape[1], device=valid.device) < counts[:, None]):
        raise ConfigError("patch_valid has padding before real patches; allowed: each image's real patches first, "
                          "then its padding (timm's NaFlexCollator)")
    return counts


def run_padded(model: nn.Module, patches: Tensor, patch_coord: Tensor, counts: Tensor) -> tuple[Tensor, ReductionState]:
    """Embed and run each group of images with the same number of real patches without its padding;
    return the tokens back in one zero-padded batch and the pass's state (with its `groups`)."""
    groups = []
    for count in counts.unique().tolist():
        index = (counts == count).nonzero().flatten()
        x, _ = model.embeds(patches[index, :count], patch_coord=patch_coord[index, :count],
                            patch_valid=torch.ones(len(index), count, dtype=torch.bool, device=patches.device))
        y, state, _ = run_blocks(model, model.norm_pre(x), None)
        groups.append((index, y, state))
    width = max(y.shape[1] for _, y, _ in groups)
    out = groups[0][1].new_zeros(len(counts), width, groups[0][1].shape[2])
    for index, y, _ in groups:
        out[index, : y.shape[1]] = y
    return out, ReductionState.gather(groups, len(counts), model.num_prefix_tokens + patches.shape[1], width)


class _ReducedNaFlex(ReducedViT):
    """timm_vit's patched loop with NaFlexViT's embedding, padded batches and pooling."""

    def _tr_embed(self, x: Tensor) -> tuple[Tensor, None]:
        x, _ = self.embeds(x)
        return self.norm_pre(x), None

    def forward_features(self, patches: Tensor, patch_coord: Tensor | None = None, patch_valid: Tensor | None = None,
                         attn_mask: Tensor | None = None):
        if attn_mask is not None:
            raise ConfigError("attn_mask is not supported on a token-reduced NaFlexViT: the mask is made from "
                              "patch_valid; call tokenreduce.remove(model) first to pass your own")
        naflex = patch_coord is not None
        counts = None if patch_valid is None else real_counts(patch_valid)
        padded = counts is not None and bool((counts < patch_valid.shape[1]).any())
        if padded and self.training and len(counts.unique()) > 1 and self.token_reducer.has_training_losses():
            raise ConfigError(f"reducer {self.token_reducer.name} trains with losses of the whole pass, which a NaFlex "
                              "batch of images with different patch counts splits into groups; allowed: batches whose "
                              "images have one number of patches, or eval mode")
        if padded:
            x, state = run_padded(self, patches, patch_coord, counts)
        else:
            x, _ = self.embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid)
            x, state, _ = run_blocks(self, self.norm_pre(x), None)
        self._tokenreduce.last_state = state
        x = self.norm(x)
        if not naflex:
            return x
        valid = None if patch_valid is None else state.real_tokens(x)[:, self.num_prefix_tokens :]
        return {"patches": x, "patch_valid": valid}

    def forward_head(self, patches: Tensor, pre_logits: bool = False, patch_valid: Tensor | None = None) -> Tensor:
        sizes = self._tokenreduce.sizes_for(patches)
        if sizes is None or (self.attn_pool is None and self.global_pool not in ("avg", "avgmax")):
            return self._tokenreduce.original_class.forward_head(self, patches, pre_logits, patch_valid)
        x = weighted_pool(self, patches, sizes, None, padded=True)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x, patch_coord: Tensor | None = None, patch_valid: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        if isinstance(x, dict):
            patch_valid, patch_coord = x.get("patch_valid", patch_valid), x.get("patch_coord", patch_coord)
            attn_mask = x.get("attn_mask", attn_mask)
            x = x["patches"]
        features = self.forward_features(x, patch_coord, patch_valid, attn_mask)
        return self.forward_head(**features) if isinstance(features, dict) else self.forward_head(features)

    def forward_intermediates(self, *args, **kwargs):
        raise ConfigError("forward_intermediates is not supported on a token-reduced NaFlexViT; call "
                          "tokenreduce.remove(model) first, or use forward_features")


@register_adapter("timm_naflex")
class TimmNaFlexAdapter(TimmViTAdapter):  # ViT's cost model
    family = "timm NaFlexViT (variable-resolution batches with padding)"
    reduced_methods = _ReducedNaFlex

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, NaFlexVit)

    def describe(self, model: nn.Module) -> ModelInfo:
        return describe(model)
