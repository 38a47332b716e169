"""Pruning baselines: random, Top-K (CLS attention), EViT (Liang et al., ICLR 2022) and L2 norm.

Each keeps a fraction of the non-prefix tokens at chosen layers, between the attention residual
and the MLP, and drops the rest (EViT fuses them into one extra token instead). Kept tokens stay
in their original order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.merge import keep_assignment
from tokenreduce.core.schedule import Schedule, no_cap
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import ATTN, KEEP_RATIO, Signals, TokenReducer, register_reducer

DEFAULT_LAYERS = (3, 6, 9)  # pruning in layers 0-2 hurts badly; the reference schedules start at 3


def require_class_token(reducer: TokenReducer, info) -> None:
    """CLS-attention methods need a class token to read the attention from."""
    if not info.has_class_token:
        raise ConfigError(
            f"{reducer.name}: ranks tokens by the class token's attention, but model {info.name} has no class "
            f"token; allowed: models with a class token (or a reducer that needs none, e.g. 'norm', 'random')"
        )


def top_tokens(scores: Tensor, num_keep: int, num_prefix: int) -> Tensor:
    """[B, P + T] bool: the prefix tokens and the `num_keep` non-prefix tokens with the highest `scores` [B, T]."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.topk(num_keep, dim=1).indices, True)
    prefix = torch.ones(scores.shape[0], num_prefix, dtype=torch.bool, device=scores.device)
    return torch.cat([prefix, keep], dim=1)


class KeepRatioPruner(TokenReducer):
    """Keep the top `ratio` of the non-prefix tokens by `scores` at `layers`; drop the others.

    ratio:        fraction of the non-prefix tokens each reducing layer keeps (rounded up)
    layers:       reducing layers (0-based); None for every layer
    prop_attn:    proportional attention (only changes anything where tokens were fused)
    trace_source: keep the map from input patches to tokens (dropped patches map to none)
    """

    fuse = False
    strength = (KEEP_RATIO,)
    cap = staticmethod(no_cap)

    def __init__(self, ratio: float = 0.7, layers: tuple[int, ...] | None = DEFAULT_LAYERS,
                 prop_attn: bool = False, trace_source: bool = False):
        if ratio is None:
            raise ConfigError(f"{self.name}: ratio=None is invalid; allowed: a keep ratio in (0, 1]")
        super().__init__(Schedule(ratio=ratio, layers=layers, owner=self.name), prop_attn, trace_source)

    def scores(self, x: Tensor, signals: Signals, state: ReductionState, layer: int) -> Tensor:
        """[B, T] how much each non-prefix token deserves to stay."""
        raise NotImplementedError

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        num_prefix = state.num_prefix
        scores = self.scores(x, signals, state, layer)
        keep = top_tokens(scores, scores.shape[1] - removal, num_prefix)
        return state.merge(x, keep_assignment(keep, n_keep=x.shape[1] - removal), "prune")


@register_reducer("random")
class RandomPruning(KeepRatioPruner):
    """Keep a uniformly random subset of the non-prefix tokens, drawn per sample and layer.

    seed: an integer makes every pass draw the same subsets (per layer, and per sample position,
          whatever the batch size); None draws from torch's global generator every pass.
    """

    def __init__(self, ratio: float = 0.7, layers: tuple[int, ...] | None = DEFAULT_LAYERS, seed: int | None = 0,
                 prop_attn: bool = False, trace_source: bool = False):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"{self.name}: seed={seed!r} is invalid; allowed: an integer >= 0, or None")
        super().__init__(ratio, layers, prop_attn, trace_source)
        self.seed = seed

    def scores(self, x: Tensor, signals: Signals, state: ReductionState, layer: int) -> Tensor:
        shape = (x.shape[0], x.shape[1] - state.num_prefix)
        if self.seed is None:
            return torch.rand(shape, device=x.device)
        if torch.compiler.is_exporting():
            # an exported graph keeps the generator object but not its re-seeding, so its draws
            # would differ from the eager model's and from one call to the next
            raise ConfigError(f"{self.name}: seed={self.seed!r} cannot be exported: each pass re-seeds a "
                              "torch.Generator of its own, which an exported graph does not repeat; "
                              "allowed: seed=None (draws from the global random source)")
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed * 100_003 + layer)
        return torch.rand(shape, generator=generator, device=x.device)


@register_reducer("topk")
class TopKPruning(KeepRatioPruner):
    """Keep the tokens that receive the most attention from the class token (mean over heads)."""

    needs = frozenset({ATTN})

    def check_model(self, info) -> None:
        super().check_model(info)
        require_class_token(self, info)

    def scores(self, x: Tensor, signals: Signals, state: ReductionState, layer: int) -> Tensor:
        return signals.cls_attn()[:, state.num_prefix :]


@register_reducer("evit")
class EViT(TopKPruning):
    """EViT: keep the top tokens by class-token attention and fuse all the others into one extra
    token, their mean weighted by that attention. The fused token is an ordinary token afterwards
    (a later layer may keep or fuse it again); its size is the sum of what it absorbed.
    """

    fuse = True
    refill = 1

    def reduce(self, x: Tensor, signals: Signals, state: ReductionState, layer: int, removal: int) -> Tensor:
        scores = self.scores(x, signals, state, layer)
        keep = top_tokens(scores, scores.shape[1] - removal, state.num_prefix)
        prefix_attn = scores.new_ones(scores.shape[0], state.num_prefix)
        # kept tokens sit alone in their slot: weight 1 keeps them bit-exact
        weights = torch.where(keep, 1.0, torch.cat([prefix_attn, scores], dim=1))
        return state.merge(x, keep_assignment(keep, fuse=True, n_keep=x.shape[1] - removal), "mean",
                           weights=weights.unsqueeze(-1))


@register_reducer("norm")
class NormPruning(KeepRatioPruner):
    """Keep the tokens with the largest L2 norm (of the hidden state after the attention residual)."""

    def scores(self, x: Tensor, signals: Signals, state: ReductionState, layer: int) -> Tensor:
        return x[:, state.num_prefix :].float().norm(dim=-1)
