"""DynamicViT: learned token pruning (Rao et al., NeurIPS 2021).

A small predictor before each pruning stage scores the tokens entering the block. In training the
keep decisions are sampled with a hard Gumbel-softmax and only mask the attention (every token is
still computed, so the batch stays rectangular and the decisions get gradients); in inference the
tokens with the best scores are kept and the others removed for real. `dynamicvit_ratio_loss` (also
`tokenreduce.losses`) is the keep-ratio loss of a training pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.core.macs import linear_macs
from tokenreduce.core.merge import keep_assignment
from tokenreduce.core.schedule import Schedule, no_cap
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, check_number, check_numbers
from tokenreduce.reducers.base import TokenReducer, carried_reducer, reduce_scope, register_reducer
from tokenreduce.reducers.pruning import top_tokens

# keys of ReductionState.extras written by a training pass
DECISIONS = "dynamicvit.decisions"  # list, one [B, T0] 0/1 keep mask per stage (straight-through gradients)
POLICY = "dynamicvit.policy"  # [B, N, 1] current keep mask, prefix included


class ScorePredictor(nn.Module):
    """Per-token keep/drop log-probabilities [B, T, 2] (index 0 = keep) from each token's own
    features and the mean of the tokens still kept."""

    def __init__(self, dim: int):
        super().__init__()
        self.local_global = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2)
        )

    def forward(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        x = self.local_global(x.to(self.head[0].weight.dtype))  # the predictor may be kept in float32
        half = x.shape[-1] // 2
        local, pooled = x[..., :half], x[..., half:]
        if policy is None:
            pooled = pooled.mean(dim=1, keepdim=True)
        else:
            policy = policy.to(pooled.dtype)
            pooled = (pooled * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.head(torch.cat([local, pooled.expand_as(local)], dim=-1)).log_softmax(dim=-1)


def softmax_with_policy(logits: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """Attention probabilities over the kept keys only; every token still attends to itself.

    logits [B, H, N, N], policy [B, N, 1] (1 keep, 0 drop, differentiable). `eps` keeps the rows of
    fully dropped tokens finite, as in the reference.
    """
    n = logits.shape[-1]
    keys = policy.reshape(policy.shape[0], 1, 1, n).float()
    eye = torch.eye(n, device=logits.device, dtype=torch.float32)
    keys = keys + (1.0 - keys) * eye
    weights = (logits.float() - logits.float().amax(dim=-1, keepdim=True)).exp() * keys
    return ((weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


@register_reducer("dynamicvit")
class DynamicViT(TokenReducer):
    """Learned pruning before the blocks at `layers`, keeping `ratios` of the original patch tokens.

    ratios:       cumulative fraction of the input's non-prefix tokens kept after each stage
    layers:       the blocks (0-based) whose input each stage prunes
    tau:          Gumbel-softmax temperature of the training decisions
    prop_attn:    proportional attention (pruning keeps every size at 1, so it changes nothing)
    trace_source: keep the map from input patches to tokens (dropped patches map to none)
    ratio_weight: weight of the keep-ratio loss in fine-tuning (`training_losses`; the paper's 2)

    The predictors are built for the model's width when the reducer is applied, and are part of
    the model's state dict (``token_reducer.predictors``). They need training (see
    `tokenreduce.losses.dynamicvit_ratio_loss`); untrained, they prune arbitrary tokens.
    """

    cap = staticmethod(no_cap)

    def __init__(self, ratios: tuple[float, ...] = (0.7, 0.49, 0.343), layers: tuple[int, ...] = (3, 6, 9),
                 tau: float = 1.0, prop_attn: bool = False, trace_source: bool = False, ratio_weight: float = 2.0):
        ratios = tuple(check_numbers(self.name, "ratios", ratios, low=0, high=1, low_open=True))
        layers = tuple(check_numbers(self.name, "layers", layers, low=0, integer=True))
        if not ratios:
            raise ConfigError(f"{self.name}: ratios=[] is invalid; allowed: a list of keep ratios in (0, 1]")
        if any(b > a for a, b in zip(ratios, ratios[1:], strict=False)):
            raise ConfigError(f"{self.name}: ratios={list(ratios)} is invalid; allowed: non-increasing keep ratios")
        if len(layers) != len(ratios) or list(layers) != sorted(set(layers)):
            raise ConfigError(
                f"{self.name}: layers={list(layers)} is invalid; allowed: increasing layers, one per ratio "
                f"({len(ratios)} for ratios={list(ratios)})"
            )
        check_number(self.name, "tau", tau, low=0, low_open=True)
        check_number(self.name, "ratio_weight", ratio_weight, low=0)
        super().__init__(Schedule(r=0, layers=layers, owner=self.name), prop_attn, trace_source)
        self.ratio_weight = float(ratio_weight)
        self.ratios, self.stages, self.tau = ratios, layers, float(tau)
        self.predictors = nn.ModuleList()

    def check_model(self, info) -> None:
        super().check_model(info)
        if len(self.predictors) != len(self.stages) or self.predictors[0].head[0].in_features != info.embed_dim:
            self.predictors = nn.ModuleList(ScorePredictor(info.embed_dim) for _ in self.stages)

    def training_losses(self, context) -> dict[str, Tensor]:
        """The keep-ratio loss of the training pass just run (the engine's loss hook), weighted by
        `ratio_weight`."""
        return {"ratio": dynamicvit_ratio_loss(context.model, weight=self.ratio_weight)}

    def removal_counts(self, num_layers: int, num_tokens: int) -> list[int]:
        kept, counts = num_tokens, [0] * num_layers
        for layer, ratio in zip(self.stages, self.ratios, strict=True):
            target = int(num_tokens * ratio)
            counts[layer], kept = kept - target, target
        return Schedule(r=counts, owner=self.name).removal_counts(num_layers, num_tokens, self.cap)

    def acts_at(self, layer: int, removal: int) -> bool:
        # training masks the attention of every block from the first stage on; the block's own
        # mode decides (the model's train()/eval() reaches its blocks, whatever the reducer's mode)
        return layer >= self.stages[0]

    def block_forward(self, ops, x: Tensor, state: ReductionState, layer: int, removal: int) -> Tensor:
        if ops.training:
            return self._masked_block(ops, x, state, layer)
        if removal == 0:
            return ops.plain(x, state.attn_bias(x.dtype))
        stage = self.stages.index(layer)
        num_prefix = state.num_prefix
        with reduce_scope():
            patches = x[:, num_prefix:]
            scores = self.predictors[stage](patches)[..., 0]
            state.add_macs(patches.shape[1] * linear_macs(self.predictors[stage]))
            keep = top_tokens(scores, patches.shape[1] - removal, num_prefix)
            x = state.merge(x, keep_assignment(keep, n_keep=x.shape[1] - removal), "prune")
        state.records[-1].tokens_attn = x.shape[1]
        return ops.plain(x, state.attn_bias(x.dtype))

    def _masked_block(self, ops, x: Tensor, state: ReductionState, layer: int) -> Tensor:
        num_prefix = state.num_prefix
        policy = state.extras.get(POLICY)
        if layer in self.stages:
            stage = self.stages.index(layer)
            patches = x[:, num_prefix:]
            previous = None if policy is None else policy[:, num_prefix:]
            log_probs = self.predictors[stage](patches, previous)
            state.add_macs(patches.shape[1] * linear_macs(self.predictors[stage]))
            keep = F.gumbel_softmax(log_probs, tau=self.tau, hard=True)[..., :1]
            if previous is not None:
                keep = keep * previous
            state.extras.setdefault(DECISIONS, []).append(keep[..., 0])
            policy = torch.cat([keep.new_ones(keep.shape[0], num_prefix, 1), keep], dim=1)
            state.extras[POLICY] = policy
        h = ops.attn_input(x)
        probs = softmax_with_policy(ops.attn_logits(*ops.attn_qk(h), state.attn_bias(x.dtype)), policy)
        x = ops.attn_residual(x, ops.attn_output(probs, ops.attn_values(h), h))
        return ops.mlp(x)


def dynamicvit_ratio_loss(model: nn.Module, weight: float = 2.0) -> Tensor:
    """DynamicViT's keep-ratio loss of the model's last forward pass (call it after a training-mode
    forward of a model carrying a "dynamicvit" reducer).

        loss = weight / S * sum over stages s of mean over the batch of (kept_s - ratio_s)^2

    where kept_s is the fraction of the input's non-prefix tokens a sample still keeps after
    stage s (the cumulative hard Gumbel decision, with straight-through gradients into the
    predictors) and ratio_s the reducer's target. Returns a scalar tensor with gradients.
    """
    reducer = carried_reducer(model, DynamicViT, "dynamicvit_ratio_loss")
    state = model._tokenreduce.last_state
    decisions = None if state is None else state.extras.get(DECISIONS)
    if not decisions:
        raise ConfigError(
            "dynamicvit_ratio_loss: the last pass made no keep decisions; run a forward pass in training mode "
            "(model.train()) first"
        )
    loss = sum(((d.float().mean(dim=1) - ratio) ** 2).mean() for d, ratio in zip(decisions, reducer.ratios, strict=False))
    return weight * loss / len(decisions)
