"""How a reducer's own loss terms (MCTF consistency, DynamicViT ratio loss) join the training objective.

A reducer contributes terms in either or both of two ways, and the engine needs nothing else:

- during the forward pass, it stores scalar tensors in the pass state:
  ``state.extras.setdefault("losses", {})["ratio"] = ...``;
- it defines ``training_losses(self, context: LossContext) -> dict[str, Tensor]``, called once per
  training step after the main forward pass; it may run the model again (e.g. with another
  schedule) and use ``context.criterion`` for losses on those passes.

Each term is weighted by ``loss.reducer_weights[name]`` (1.0 when not listed, 0 drops it) and added to
the main loss; ``loss.reducer_losses=false`` skips the hook entirely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from tokenreduce.api import reducer_of
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError

EXTRAS_KEY = "losses"


@dataclass
class LossContext:
    """What a reducer's `training_losses` gets for one training step."""

    model: nn.Module  # the reduced model; calling it again runs another pass with the same weights
    images: Tensor  # the batch as the model saw it (after mixup/cutmix)
    tokens: Tensor  # model.forward_features(images): the tokens the head read
    targets: Tensor  # what the main loss compared with: class indices, or soft targets under mixup
    labels: Tensor  # the batch's class indices before mixup
    logits: Tensor  # the model's output for `images`
    criterion: Callable[[Tensor, Tensor], Tensor]  # the main loss: criterion(logits, targets)
    state: ReductionState | None  # the state of the pass that produced `logits`


def reducer_loss_terms(context: LossContext) -> dict[str, Tensor]:
    """The loss terms the model's reducer reports for this step, by name."""
    terms = dict(context.state.extras.get(EXTRAS_KEY, {})) if context.state is not None else {}
    hook = getattr(reducer_of(context.model), "training_losses", None)
    if callable(hook):
        returned = hook(context) or {}
        both = sorted(set(terms) & set(returned))
        if both:
            raise ConfigError(f"reducer loss term(s) {', '.join(both)} reported twice (pass state and training_losses)")
        terms.update(returned)
    for name, value in terms.items():
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ConfigError(f"reducer loss term {name!r} must be a scalar tensor, got {type(value).__name__}")
    return terms


def weigh(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> dict[str, Tensor]:
    """Each term times its weight (1.0 when not listed); terms of weight 0 are left out."""
    out = {}
    for name, value in terms.items():
        weight = float(weights.get(name, 1.0))
        if weight != 0.0:
            out[name] = weight * value.reshape(())
    return out


def check_weight_names(weights: Mapping[str, float], reported: set[str], reducer: str) -> None:
    """A weight for a term the reducer never reports is a misspelling: fail instead of ignoring it."""
    unknown = sorted(set(weights) - reported)
    if unknown:
        raise ConfigError(
            f"loss.reducer_weights names {', '.join(unknown)}, which reducer {reducer!r} does not report; "
            f"reported terms: {', '.join(sorted(reported)) or 'none'}"
        )
