"""Training losses that belong to a reduction method, for a training loop to call.

- `mctf_consistency_loss(model, images, targets)`: MCTF's token-reduction consistency step (runs
  the model twice and returns the whole loss); `mctf_consistency_terms` is its teacher half, for a
  loop that already ran the student pass (the engine's `MCTF.training_losses`).
- `dynamicvit_ratio_loss(model)`: DynamicViT's keep-ratio loss of the model's last training pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.adapters import is_patched
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.dynamicvit import DECISIONS, DynamicViT
from tokenreduce.reducers.mctf import MCTF


def _reducer(model: nn.Module, cls: type, who: str):
    reducer = getattr(model, "token_reducer", None) if is_patched(model) else None
    if not isinstance(reducer, cls):
        raise ConfigError(f"{who}: the model must carry a {cls.name!r} reducer (tokenreduce.apply(model, {cls.name!r}))")
    return reducer


def draw_teacher_r(r_max: int | float, generator: torch.Generator | None = None) -> int | float:
    """The second pass's r: uniform over {0 .. r_max - 1}, or for a fraction r_max < 1 uniform over
    the hundredths in [0, r_max) (the reference's two conventions)."""
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or r_max <= 0:
        raise ConfigError(f"mctf_consistency_loss: r_max={r_max!r} is invalid; allowed: an integer >= 1 or a fraction in (0, 1)")
    if r_max < 1:
        return int(torch.randint(0, max(int(r_max * 100), 1), (1,), generator=generator)) / 100
    return int(torch.randint(0, int(r_max), (1,), generator=generator))


def _hard_labels(targets: Tensor, labels: Tensor | None) -> Tensor:
    if labels is not None:
        return labels
    if targets.dim() != 1:
        raise ConfigError("mctf_consistency_loss: targets are soft; pass labels= (hard labels [B]) for the confidence test")
    return targets


def _features_and_logits(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    tokens = model.forward_features(images)
    return model.forward_head(tokens), model.forward_head(tokens, pre_logits=True)


def _consistency(student_logits: Tensor, student_feature: Tensor, teacher_feature: Tensor, labels: Tensor,
                 confidence: float) -> tuple[Tensor, Tensor]:
    """Mean over confident samples of mean_c (f_teacher.detach() - f_student)^2, and the confident mask."""
    with torch.no_grad():
        probs = student_logits.float().softmax(dim=-1)
        index = labels.long().unsqueeze(1) if labels.dim() == 1 else labels.long()
        confident = (probs.gather(1, index).sum(dim=1) > confidence).float()
    distance = (teacher_feature.detach().float() - student_feature.float()).pow(2).mean(dim=1)
    return (distance * confident).sum() / confident.sum().clamp_min(1.0), confident


def _r_tensor(r_teacher) -> Tensor:
    return torch.tensor(r_teacher if not isinstance(r_teacher, list) else sum(r_teacher), dtype=torch.float32)


def mctf_consistency_terms(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    student_logits: Tensor,
    student_feature: Tensor,
    *,
    labels: Tensor | None = None,
    r_teacher: int | float | list[int] | None = None,
    r_max: int | float = 8,
    confidence: float = 0.4,
    criterion=None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The teacher half of MCTF's consistency objective, for a loop that already ran the student.

    Runs `model` (carrying an "mctf" reducer) on `images` with a smaller r' (drawn, see
    `draw_teacher_r`, unless `r_teacher` is given) and returns

        ce_teacher  = criterion(teacher logits, targets)
        consistency = mean over confident samples of mean_c (f_teacher.detach() - f_student)^2

    where f is the feature the classifier reads (`model.forward_head(tokens, pre_logits=True)`: the
    class token after the final norm for class-token models, the pooled feature otherwise), and a
    sample is confident when the student gives its true class a probability above `confidence`.
    Also "confident" (fraction of confident samples) and "r_teacher".

    targets:   what `criterion` takes: class indices [B] or soft targets [B, classes] (mixup).
    labels:    hard labels for the confidence test, [B], or [B, k] when a sample has k true classes
               (mixup of two images: ``torch.stack([y, y.flip(0)], 1)``; the probabilities add up);
               needed when `targets` are soft.
    criterion: callable(logits, targets) -> scalar; default cross-entropy.
    """
    reducer = _reducer(model, MCTF, "mctf_consistency_loss")
    labels = _hard_labels(targets, labels)
    r_teacher = draw_teacher_r(r_max, generator) if r_teacher is None else r_teacher
    with reducer.using_r(r_teacher):
        teacher_logits, teacher_feature = _features_and_logits(model, images)
    consistency, confident = _consistency(student_logits, student_feature, teacher_feature, labels, confidence)
    return {
        "ce_teacher": (criterion or F.cross_entropy)(teacher_logits, targets),
        "consistency": consistency,
        "confident": confident.mean(),
        "r_teacher": _r_tensor(r_teacher),
    }


def mctf_consistency_loss(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    labels: Tensor | None = None,
    r_teacher: int | float | list[int] | None = None,
    r_max: int | float = 8,
    weight: float = 3.0,
    confidence: float = 0.4,
    criterion=None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """MCTF's whole token-reduction consistency objective for one training batch:

        loss = CE(student) + CE(teacher) + weight * consistency

    with the teacher pass and `consistency` as in `mctf_consistency_terms`. The teacher runs first
    and the student (the reducer's own r) last, so `tokenreduce.stats` describes the student.
    Returns "loss" (to backpropagate), "ce_student", "ce_teacher", "consistency" (already
    multiplied by `weight`), "confident" and "r_teacher".
    """
    reducer = _reducer(model, MCTF, "mctf_consistency_loss")
    labels = _hard_labels(targets, labels)
    criterion = criterion or F.cross_entropy
    r_teacher = draw_teacher_r(r_max, generator) if r_teacher is None else r_teacher
    with reducer.using_r(r_teacher):
        teacher_logits, teacher_feature = _features_and_logits(model, images)
    student_logits, student_feature = _features_and_logits(model, images)
    consistency, confident = _consistency(student_logits, student_feature, teacher_feature, labels, confidence)
    ce_student, ce_teacher = criterion(student_logits, targets), criterion(teacher_logits, targets)
    consistency = weight * consistency
    return {
        "loss": ce_student + ce_teacher + consistency,
        "ce_student": ce_student.detach(),
        "ce_teacher": ce_teacher.detach(),
        "consistency": consistency.detach(),
        "confident": confident.mean(),
        "r_teacher": _r_tensor(r_teacher),
    }


def dynamicvit_ratio_loss(model: nn.Module, weight: float = 2.0) -> Tensor:
    """DynamicViT's keep-ratio loss of the model's last forward pass (call it after a training-mode
    forward of a model carrying a "dynamicvit" reducer).

        loss = weight / S * sum over stages s of mean over the batch of (kept_s - ratio_s)^2

    where kept_s is the fraction of the input's non-prefix tokens a sample still keeps after
    stage s (the cumulative hard Gumbel decision, with straight-through gradients into the
    predictors) and ratio_s the reducer's target. Returns a scalar tensor with gradients.
    """
    reducer = _reducer(model, DynamicViT, "dynamicvit_ratio_loss")
    state = model._tokenreduce.last_state
    decisions = None if state is None else state.extras.get(DECISIONS)
    if not decisions:
        raise ConfigError(
            "dynamicvit_ratio_loss: the last pass made no keep decisions; run a forward pass in training mode "
            "(model.train()) first"
        )
    loss = sum(((d.float().mean(dim=1) - ratio) ** 2).mean() for d, ratio in zip(decisions, reducer.ratios, strict=False))
    return weight * loss / len(decisions)
