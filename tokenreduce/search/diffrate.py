"""DiffRate's differentiable search of per-layer prune and merge rates, with the model frozen.

Chen et al., *DiffRate: Differentiable Compression Rate for Efficient Vision Transformers*,
ICCV 2023 (arXiv 2305.17997). Every layer but the first has two learnable distributions over the
candidate kept-token counts `T, T - g, T - 2g, ... >= 1` (T patches, g the granularity): one for
pruning, one for merging. A masked forward pass runs the model's own blocks through the timm
adapter's block loop, with a reducer (`MaskedRates`) that acts at every block:

- each layer sorts its non-prefix tokens by the class token's attention (mean over heads), the
  tokens still alive first;
- pruning: the kept count is the expected candidate, rounded up; the tokens ranked past it get
  mask 0 in the forward pass, while the gradient flows through the differentiable proxy: the
  probability that the token at rank j is kept, the summed probability of the candidates that
  keep at least j + 1 tokens (a straight-through estimator);
- merging: likewise, and the masked tokens are merged into the most similar (keys, cosine) of
  the tokens that stay, by size-weighted mean, so they contribute through those destinations;
- tokens are never removed: the masks enter every later attention as weights on the keys;
- the expected MACs follow from the expected kept counts of every layer.

The loss is the task loss plus `flops_weight * (expected MAC fraction - target)^2`, minimised
by Adam on the logits alone. The searched schedule is every layer's expected kept count, rounded up
(what the forward pass ran and the cost term measured), made to fit the target (see `diffrate_search`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from tokenreduce.adapters import is_patched
from tokenreduce.adapters.blocks import run_blocks
from tokenreduce.adapters.timm_vit import ReducedViT, TimmBlockOps, block_costs, describe
from tokenreduce.cost import reducer_macs
from tokenreduce.errors import ConfigError, UnsupportedModelError, check_number
from tokenreduce.reducers.diffrate import split_counts

POOLS = ("token", "avg")
SOFTMAX_EPS = 1e-6  # added to the masked softmax, as DiffRate does, so a row never divides by 0
CONFIG_KEYS = ("target", "batch_size", "lr", "flops_weight", "granularity", "seed")


# --- the differentiable proxy ------------------------------------------------------------------
def candidates(num_tokens: int, granularity: int) -> Tensor:
    """The candidate kept counts of the non-prefix tokens, largest first: T, T - g, ... >= 1."""
    return torch.arange(num_tokens, 0, -granularity, dtype=torch.float32)


def keep_probability(probs: Tensor, kept: Tensor, num_tokens: int) -> Tensor:
    """[..., T] the probability that the token at importance rank j (0 = most important) is kept:
    the summed probability of the candidates (kept counts `kept` [K], probabilities `probs` [..., K])
    that keep at least j + 1 tokens."""
    ranks = torch.arange(1, num_tokens + 1, device=probs.device, dtype=kept.dtype)
    return probs @ (kept.to(probs.device)[:, None] >= ranks[None, :]).to(probs.dtype)


def ste_ceil(x: Tensor) -> Tensor:
    """ceil(x) in the forward pass, the identity's gradient in the backward pass."""
    return x + (x.ceil() - x).detach()


def expected_kept(logits: Tensor, kept: Tensor) -> Tensor:
    """The expected kept count of every row of `logits` [..., K], rounded up (straight through)."""
    return ste_ceil(logits.softmax(dim=-1) @ kept.to(logits.device))


def layer_counts(prune_kept: Tensor, merge_kept: Tensor, num_tokens: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per searched layer, (tokens entering, after pruning, after merging) of the non-prefix tokens,
    from the kept counts [L'] of pruning and merging: pruning keeps min(entering, its count), merging
    min(after pruning, its count) but removes at most half (the fixed reducer's cap)."""
    tokens = prune_kept.new_tensor(float(num_tokens))
    counts = []
    for pk, mk in zip(prune_kept, merge_kept, strict=True):
        pruned = torch.minimum(tokens, pk)
        merged = torch.minimum(pruned, torch.maximum(mk, ste_ceil(pruned / 2)))
        counts.append((tokens, pruned, merged))
        tokens = merged
    return counts


class CostModel:
    """The MACs of one image for per-layer token counts, as `tokenreduce.stats` counts them for the
    "diffrate" reducer: the blocks by their token counts, its matching (merged x kept x key dim),
    and the embedding and head, which do not depend on the counts."""

    def __init__(self, model: nn.Module):
        self.costs = block_costs(model)
        self.prefix = model.num_prefix_tokens
        self.num_tokens = model.patch_embed.num_patches
        self.key_dim = self.costs[0].attn_dim // model.blocks[0].attn.num_heads
        self.baseline = reducer_macs(model, "none")
        full = self.prefix + self.num_tokens
        self.fixed = self.baseline - sum(c.macs(full, full) for c in self.costs)

    def macs(self, counts) -> Tensor | int:
        """`counts`: per layer (entering, after pruning, after merging), non-prefix, ints or tensors."""
        total = self.fixed
        for cost, (entering, pruned, merged) in zip(self.costs, counts, strict=True):
            total = total + cost.macs(self.prefix + entering, self.prefix + merged)
            total = total + (pruned - merged) * merged * self.key_dim  # merged sources x destinations
        return total

    def schedule_counts(self, prune: list[int], merge: list[int]) -> list[tuple[int, int, int]]:
        tokens, counts = self.num_tokens, []
        for p, m in zip(prune, merge, strict=True):
            pruned, merged = split_counts(p, m, tokens)
            counts.append((tokens, tokens - pruned, tokens - pruned - merged))
            tokens -= pruned + merged
        return counts

    def fraction(self, prune: list[int], merge: list[int]) -> float:
        """The MAC fraction of the "diffrate" reducer with these per-layer counts."""
        return self.macs(self.schedule_counts(prune, merge)) / self.baseline


# --- the masked forward pass -------------------------------------------------------------------
def masked_softmax(logits: Tensor, mask: Tensor, eps: float = SOFTMAX_EPS) -> Tensor:
    """Softmax over the keys with each key weighted by its mask [B, N] (1 kept, 0 removed), a
    token always seeing itself; `eps` keeps rows of removed tokens finite."""
    n = logits.shape[-1]
    policy = mask[:, None, None, :].float()
    eye = torch.eye(n, device=logits.device)
    policy = policy + (1.0 - policy) * eye
    weights = (logits.float() - logits.float().amax(dim=-1, keepdim=True)).exp() * policy
    return ((weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


def _sort_tokens(order: Tensor, prefix: int, *tensors: Tensor) -> list[Tensor]:
    """Reorder the non-prefix tokens of every [B, N, ...] tensor by `order` [B, T]; prefix first."""
    out = []
    for t in tensors:
        rest = t[:, prefix:]
        index = order.view(*order.shape, *([1] * (rest.dim() - 2))).expand(-1, -1, *rest.shape[2:])
        out.append(torch.cat([t[:, :prefix], rest.gather(1, index)], dim=1))
    return out


def _merge_sorted(x: Tensor, sizes: Tensor, keys: Tensor, prefix: int, keep: int, end: int) -> tuple[Tensor, Tensor]:
    """Merge the sorted non-prefix tokens at ranks keep .. end-1 into the most similar (cosine of
    `keys`) of ranks 0 .. keep-1, by size-weighted mean; the sources stay in place (masked)."""
    with torch.no_grad():
        metric = F.normalize(keys[:, prefix:].float(), dim=-1)
        partner = (metric[:, keep:end] @ metric[:, :keep].transpose(-1, -2)).argmax(dim=-1)
    rest, rest_sizes = x[:, prefix:].float(), sizes[:, prefix:]
    weighted = rest * rest_sizes
    index = partner.unsqueeze(-1)
    dest = weighted[:, :keep].scatter_add(1, index.expand(-1, -1, x.shape[-1]), weighted[:, keep:end])
    dest_sizes = rest_sizes[:, :keep].scatter_add(1, index, rest_sizes[:, keep:end])
    x = torch.cat([x[:, :prefix], (dest / dest_sizes).to(x.dtype), x[:, prefix + keep :]], dim=1)
    sizes = torch.cat([sizes[:, :prefix], dest_sizes, sizes[:, prefix + keep :]], dim=1)
    return x, sizes


def _straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    return hard + soft - soft.detach()


SEARCH_STATE = "diffrate.search"  # key of ReductionState.extras: the masked pass's sizes, mask and tokens alive


class MaskedRates:
    """DiffRate's masked pass as a reducer the block loop runs at every block: each block attends with
    the masks, and every block but the first sorts, prunes (masks) and merges as the logits say. Tokens
    are never removed; the pass's sizes and mask are its own, in `state.extras[SEARCH_STATE]`."""

    trace_source = False

    def __init__(self, prune_logits: Tensor | None, merge_logits: Tensor | None, kept: Tensor, prop_attn: bool):
        self.prune_logits, self.merge_logits, self.kept, self.prop_attn = prune_logits, merge_logits, kept, prop_attn

    def removal_counts(self, num_layers: int, num_tokens: int) -> list[int]:
        return [0] * num_layers

    def acts_at(self, layer: int, removal: int) -> bool:
        return True

    def block_forward(self, ops, x: Tensor, state, layer: int, removal: int) -> Tensor:
        prefix = state.num_prefix
        tokens = x.shape[1] - prefix
        if layer == 0:
            batch = x.shape[0]
            state.extras[SEARCH_STATE] = {"sizes": x.new_ones(batch, x.shape[1], 1, dtype=torch.float32),
                                          "mask": x.new_ones(batch, x.shape[1], dtype=torch.float32), "alive": tokens}
        search = state.extras[SEARCH_STATE]
        sizes, mask, alive = search["sizes"], search["mask"], search["alive"]
        kept, ranks = self.kept, torch.arange(tokens, device=x.device)
        h = ops.attn_input(x)
        q, k = ops.attn_qk(h)
        bias = sizes.log().to(x.dtype).transpose(1, 2).unsqueeze(1) if self.prop_attn else None
        probs = masked_softmax(ops.attn_logits(q, k, bias), mask)
        x = ops.attn_residual(x, ops.attn_output(probs, ops.attn_values(h), h))
        if layer > 0 and self.prune_logits is not None:
            importance = probs[:, :, 0, prefix:].float().mean(dim=1).detach()
            alive_first = importance + 2.0 * mask[:, prefix:].detach()
            order = alive_first.argsort(dim=1, descending=True, stable=True)
            x, sizes, mask, keys = _sort_tokens(order, prefix, x, sizes, mask, k.mean(dim=1))
            pk_logits, mk_logits = self.prune_logits[layer - 1], self.merge_logits[layer - 1]
            prune_keep = int(expected_kept(pk_logits, kept))
            if prune_keep < alive:
                soft = keep_probability(pk_logits.softmax(-1), kept, tokens)
                step = _straight_through((ranks < prune_keep).float(), soft)
                mask = torch.cat([mask[:, :prefix], mask[:, prefix:] * step], dim=1)
            middle = min(alive, prune_keep)
            merge_keep = max(int(expected_kept(mk_logits, kept)), math.ceil(middle / 2))
            if merge_keep < middle:
                x, sizes = _merge_sorted(x, sizes, keys, prefix, merge_keep, middle)
                soft = keep_probability(mk_logits.softmax(-1), kept, tokens)
                step = _straight_through((ranks < merge_keep).float(), soft)
                mask = torch.cat([mask[:, :prefix], mask[:, prefix:] * step], dim=1)
            alive = min(middle, merge_keep)
        search.update(sizes=sizes, mask=mask, alive=alive)
        return ops.mlp(x)


class _SearchLoop:
    """A timm VisionTransformer as the block loop reads it, with the search's reducer in place of any
    the model carries (so the model itself is not patched or changed)."""

    def __init__(self, model: nn.Module, reducer: MaskedRates):
        self.model, self.token_reducer = model, reducer
        self.num_prefix_tokens, self.blocks = model.num_prefix_tokens, model.blocks
        self.grad_checkpointing = model.grad_checkpointing

    def _tr_start(self, state, extra) -> None:
        ReducedViT._tr_start(self.model, state, extra)

    def _tr_block_ops(self, block: nn.Module, state, extra, checkpointing: bool) -> TimmBlockOps:
        return ReducedViT._tr_block_ops(self.model, block, state, extra, checkpointing)


def masked_forward(model: nn.Module, images: Tensor, prune_logits: Tensor | None, merge_logits: Tensor | None,
                   kept: Tensor, prop_attn: bool = True) -> Tensor:
    """The model's logits with DiffRate's masks (layer 0 never reduces), run by the timm adapter's block
    loop. With `prune_logits` None, nothing is masked: the unreduced model (up to the softmax's eps)."""
    prefix = model.num_prefix_tokens
    x, extra = ReducedViT._tr_embed(model, images)
    x, state, _ = run_blocks(_SearchLoop(model, MaskedRates(prune_logits, merge_logits, kept, prop_attn)), x, extra)
    search = state.extras[SEARCH_STATE]
    x = model.norm(x)
    if model.global_pool == "avg":  # the mean of the tokens still alive, weighted by their sizes
        first = 0 if getattr(model, "pool_include_prefix", False) else prefix
        weights = (search["mask"].unsqueeze(-1) * search["sizes"])[:, first:]
        pooled = ((x[:, first:].float() * weights).sum(dim=1) / weights.sum(dim=1)).to(x.dtype)
    else:
        pooled = x[:, 0]
    return model.head(model.head_drop(model.fc_norm(pooled)))


# --- the search --------------------------------------------------------------------------------
def check_search_model(model: nn.Module) -> None:
    """The search runs timm's VisionTransformer (its embedding, blocks and head): refuse anything else."""
    original = model._tokenreduce.original_class if is_patched(model) else type(model)
    if original is not VisionTransformer:
        raise ConfigError(f"diffrate_search: model class {original.__name__} is not supported; allowed: a plain "
                          "timm VisionTransformer (possibly patched by tokenreduce.apply)")
    try:
        describe(model)
    except UnsupportedModelError as error:
        raise ConfigError(f"diffrate_search: {error}") from error
    if getattr(model, "cls_token", None) is None:
        raise ConfigError("diffrate_search: ranks tokens by the class token's attention, but the model has no class "
                          "token; allowed: models with a class token")
    if model.global_pool not in POOLS:
        raise ConfigError(f"diffrate_search: global_pool={model.global_pool!r} is not supported; allowed: "
                          f"{', '.join(POOLS)}")


def _check_arguments(model, images, labels, target, steps, batch_size, lr, flops_weight, granularity, seed) -> None:
    who = "diffrate_search"
    check_number(who, "target", target, low=0, high=1, low_open=True)
    check_number(who, "steps", steps, low=0, integer=True)
    check_number(who, "batch_size", batch_size, low=1, integer=True)
    check_number(who, "lr", lr, low=0, low_open=True, finite=True)
    check_number(who, "flops_weight", flops_weight, low=0, finite=True)
    check_number(who, "granularity", granularity, low=1, high=model.patch_embed.num_patches, integer=True)
    check_number(who, "seed", seed, low=0, integer=True)
    if not isinstance(images, Tensor) or images.dim() != 4 or len(images) == 0:
        raise ConfigError(f"{who}: images must be a non-empty [N, C, H, W] tensor, got "
                          f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (len(images),)):
        raise ConfigError(f"{who}: labels must be None or a [{len(images)}] tensor, one class per image")


def _snapshot(step, prune_logits, merge_logits, optimizer, generator, history, config) -> dict:
    return {
        "step": step,
        "prune_logits": prune_logits.detach().cpu().clone(),
        "merge_logits": merge_logits.detach().cpu().clone(),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "generator": generator.get_state().clone(),
        "history": [dict(entry) for entry in history],
        "config": dict(config),
    }


def removals_from_kept(prune_kept: list[int], merge_kept: list[int], num_tokens: int) -> tuple[list, list]:
    """Per-layer removal counts for the "diffrate" reducer from the kept counts of the searched layers
    (layer 0 removes nothing): pruning keeps min(entering, its count), merging then min(left, its
    count), within the reducer's caps."""
    prune, merge, tokens = [0], [0], num_tokens
    for pk, mk in zip(prune_kept, merge_kept, strict=True):
        pruned = max(0, tokens - int(pk))
        left = tokens - min(pruned, tokens - 1)
        pruned, merged = split_counts(pruned, max(0, left - int(mk)), tokens)
        prune.append(pruned)
        merge.append(merged)
        tokens -= pruned + merged
    return prune, merge


def schedule_from_logits(prune_logits: Tensor, merge_logits: Tensor, kept: Tensor, num_tokens: int,
                         rule: str = "expected") -> tuple[list, list]:
    """The schedule the logits stand for: "expected", every layer's expected kept count rounded up
    (what the search's forward pass ran and its cost term measured; DiffRate's code keeps this), or
    "argmax", every layer's most probable candidate."""
    if rule == "expected":
        pk, mk = expected_kept(prune_logits, kept), expected_kept(merge_logits, kept)
    elif rule == "argmax":
        pk, mk = kept[prune_logits.argmax(dim=-1)], kept[merge_logits.argmax(dim=-1)]
    else:
        raise ConfigError(f"schedule_from_logits: rule={rule!r} is invalid; allowed: 'expected', 'argmax'")
    return removals_from_kept(pk.long().tolist(), mk.long().tolist(), num_tokens)


def fit_to_target(cost: CostModel, prune: list[int], merge: list[int], target: float) -> tuple[list, list]:
    """Raise the removal of the latest layers, one token at a time, until the MAC fraction is at most
    `target`: first merging (from the last layer back to layer 1, each up to its cap), then, where
    that is not enough, pruning likewise."""
    prune, merge = list(prune), list(merge)
    for counts in (merge, prune):
        for layer in range(len(prune) - 1, 0, -1):
            while cost.fraction(prune, merge) > target:
                tokens = cost.schedule_counts(prune, merge)[layer][0]
                before = split_counts(prune[layer], merge[layer], tokens)
                counts[layer] += 1
                if split_counts(prune[layer], merge[layer], tokens) == before:  # at its cap
                    counts[layer] -= 1
                    break
    return prune, merge


def diffrate_search(model, images: Tensor, labels: Tensor | None, target: float, *, steps: int = 200,
                    batch_size: int = 64, lr: float = 0.01, flops_weight: float = 100.0, granularity: int = 1,
                    seed: int = 0, state: dict | None = None,
                    on_step: Callable[[dict], None] | None = None) -> dict:
    """Search DiffRate's per-layer prune and merge counts for `model` at `target` of its MACs.

    images, labels: the calibration set on the model's device and dtype; each step draws
        `batch_size` of them with a generator seeded by `seed`. With labels the task loss is the
        cross-entropy (as DiffRate); without, the KL divergence from the unreduced model's output.
    target: the MAC fraction (of the unreduced model's, as `tokenreduce.cost.reducer_macs` counts).
    flops_weight: the weight of the squared distance of the expected MAC fraction from `target`
        (100: the reference's 5 per squared GFLOP on DeiT-S's 4.6 GFLOPs, in MAC-fraction units).
    granularity: the step between candidate kept counts.
    state / on_step: after every step `on_step` receives a dict (plain values and tensors, for
        `torch.save`) from which `diffrate_search(..., state=that)` continues exactly.

    Returns {"prune": [...], "merge": [...]} (per-layer removal counts for the "diffrate" reducer;
    layer 0 never reduces), "mac_fraction" (measured, at most `target`) and "history" (per step the
    loss, task loss and expected MAC fraction). Every layer's expected kept count, rounded up, is
    taken (the most probable candidates are under "argmax", for comparison); if their MAC fraction
    exceeds the target, `fit_to_target` merges more in the latest layers. The model is left as it
    came (weights, requires_grad, mode, reducer).
    """
    check_search_model(model)
    _check_arguments(model, images, labels, target, steps, batch_size, lr, flops_weight, granularity, seed)
    config = {"target": float(target), "batch_size": batch_size, "lr": float(lr), "flops_weight": float(flops_weight),
              "granularity": granularity, "seed": seed}
    num_tokens, depth = model.patch_embed.num_patches, len(model.blocks)
    kept = candidates(num_tokens, granularity)
    device = images.device
    cost = CostModel(model)
    generator = torch.Generator().manual_seed(seed)
    prune_logits = nn.Parameter(torch.zeros(depth - 1, len(kept), device=device))
    merge_logits = nn.Parameter(torch.zeros(depth - 1, len(kept), device=device))
    optimizer = torch.optim.Adam([prune_logits, merge_logits], lr=lr)
    history, start = [], 0
    if state is not None:
        changed = [k for k in CONFIG_KEYS if state.get("config", {}).get(k) != config[k]]
        if changed or tuple(state["prune_logits"].shape) != tuple(prune_logits.shape):
            raise ConfigError(f"diffrate_search: state was saved by a search with other settings "
                              f"({', '.join(changed) or 'model or granularity'}); allowed: the same settings, "
                              "only steps may change")
        with torch.no_grad():
            prune_logits.copy_(state["prune_logits"])
            merge_logits.copy_(state["merge_logits"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history, start = [dict(entry) for entry in state["history"]], state["step"]
    kept = kept.to(device)

    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for step in range(start, steps):
            index = torch.randperm(len(images), generator=generator)[:batch_size].to(device)
            batch = images[index]
            logits = masked_forward(model, batch, prune_logits, merge_logits, kept)
            if labels is not None:
                task = F.cross_entropy(logits.float(), labels[index])
            else:
                with torch.no_grad():
                    teacher = masked_forward(model, batch, None, None, kept)
                task = F.kl_div(logits.float().log_softmax(-1), teacher.float().log_softmax(-1), log_target=True,
                                reduction="batchmean")
            counts = layer_counts(expected_kept(prune_logits, kept), expected_kept(merge_logits, kept), num_tokens)
            first = [(prune_logits.new_tensor(float(num_tokens)),) * 3]
            fraction = cost.macs(first + counts) / cost.baseline
            loss = task + flops_weight * (fraction - target) ** 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append({"step": step + 1, "loss": loss.item(), "task_loss": task.item(),
                            "mac_fraction": fraction.item()})
            if on_step is not None:
                on_step(_snapshot(step + 1, prune_logits, merge_logits, optimizer, generator, history, config))
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)

    with torch.no_grad():
        searched = [p.detach().cpu() for p in (prune_logits, merge_logits)]
        prune, merge = schedule_from_logits(*searched, kept.cpu(), num_tokens)
        argmax_prune, argmax_merge = schedule_from_logits(*searched, kept.cpu(), num_tokens, rule="argmax")
    prune, merge = fit_to_target(cost, prune, merge, target)
    measured = reducer_macs(model, "diffrate", prune=prune, merge=merge) / cost.baseline
    return {"prune": prune, "merge": merge, "mac_fraction": measured, "history": history,
            "argmax": {"prune": argmax_prune, "merge": argmax_merge,
                       "mac_fraction": cost.fraction(argmax_prune, argmax_merge)}}
