"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee et al., CVPR 2024), and its
token-reduction consistency loss (`mctf_consistency_loss`, also `tokenreduce.losses`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.core.matching import alternate_split, matching_macs
from tokenreduce.core.merge import Assignment, combine_attention, stable_argsort
from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, check_flag, check_number
from tokenreduce.reducers.base import (
    ATTN,
    REMOVAL_COUNT,
    Strength,
    TokenReducer,
    carried_reducer,
    reduce_scope,
    register_reducer,
)

# MCTF-Fast: a third of the tokens at three layers instead of r per layer (the reference's fast preset).
MCTF_FAST = {"r": 0.35, "layers": [3, 6, 9]}
MODES = (0, 1, 2)
# pooling name -> (merge mode of `combine`, whether the attention received weights the tokens)
POOLINGS = {"attn": ("wavg", True), "size": ("wavg", False), "mean": ("mean", False), "max": ("max", False)}


def _power(weight: Tensor, tau: float) -> Tensor:
    return weight if tau == 1 else weight ** (1.0 / tau)  # tau = inf: exponent 0, the criterion no longer ranks


def multi_criteria_scores(
    metric: Tensor,
    num_prefix: int,
    received: Tensor | None = None,
    sizes: Tensor | None = None,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
) -> Tensor:
    """Edge scores [B, |A|, |B|] between the A and B tokens (alternate split of the non-prefix tokens).

    metric:   [B, N, C] hidden states; similarity ``((cos + 1) / 2) ^ (1 / tau_sim)``.
    received: [B, N] attention each token receives (mean over heads and queries), or None;
              informativeness ``(u_a * u_b) ^ (1 / tau_info)`` with ``u = (1/a) / max(1/a)``.
    sizes:    [B, N, 1] token sizes, or None (all 1); ``(z_a * z_b) ^ (1 / tau_size)``,
              ``z = (1/size) / max(1/size)``. The maxima run over every token, prefix included.
    A temperature of 0 leaves its criterion out.
    """
    batch, n, _ = metric.shape
    sa, sb = alternate_split(num_prefix, n - num_prefix)

    def split(values: Tensor) -> tuple[Tensor, Tensor]:
        rest = values[:, num_prefix:]
        return rest[:, sa], rest[:, sb]

    if tau_sim:
        a, b = split(F.normalize(metric.float(), dim=-1))
        scores = _power(((a @ b.transpose(-1, -2) + 1) / 2).clamp(0, 1), tau_sim)
    else:
        na, nb = len(range(n - num_prefix)[sa]), len(range(n - num_prefix)[sb])
        scores = metric.new_ones(batch, na, nb, dtype=torch.float32)
    for values, tau in ((received, tau_info), (None if sizes is None else sizes[..., 0], tau_size)):
        if tau and values is not None:
            inverse = 1.0 / values.float().clamp_min(torch.finfo(torch.float32).tiny)
            inverse = inverse / inverse.amax(dim=1, keepdim=True)
            ia, ib = split(inverse)
            scores = scores * _power(ia.unsqueeze(2) * ib.unsqueeze(1), tau)
    return scores


@torch.no_grad()
def mctf_matching(
    metric: Tensor,
    r: int,
    num_prefix: int,
    received: Tensor | None = None,
    sizes: Tensor | None = None,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    bidirectional: bool = True,
) -> Assignment | None:
    """MCTF's bidirectional matching on the multiplied criteria; None when nothing merges.

    Step 1 merges the ``r1 = r // 2`` A tokens with the best edges into their best B partner (all
    ``r`` without `bidirectional`). Step 2 reuses the same scores restricted to the A tokens left:
    the ``r - r1`` B tokens with the best edges merge into their best remaining A token (a B token
    may carry what it absorbed in step 1 along). Output order: prefix, surviving A tokens in their
    order, then the surviving B tokens, by descending best score in step 2 (in their order when
    there is no step 2). Ties break towards the lower index.
    """
    batch, n, _ = metric.shape
    device = metric.device
    if r <= 0 or n - num_prefix < 2:
        return None
    scores = multi_criteria_scores(metric, num_prefix, received, sizes, tau_sim, tau_info, tau_size)
    na, nb = scores.shape[1], scores.shape[2]
    r1 = min(r // 2 if bidirectional else r, na)
    r2 = min(r - r1, nb) if bidirectional else 0

    node_max, node_idx = scores.max(dim=-1)
    order = stable_argsort(node_max, descending=True)
    merged_a = torch.zeros(batch, na, dtype=torch.bool, device=device).scatter_(1, order[:, :r1], True)
    slot_a = num_prefix + (~merged_a).long().cumsum(dim=1) - 1  # the slot of every unmerged A token
    first_b = num_prefix + na - r1
    positions_b = torch.arange(nb, device=device).expand(batch, -1)
    if r2 > 0:
        scores_b = scores.masked_fill(merged_a.unsqueeze(-1), float("-inf")).transpose(1, 2)
        node_max2, node_idx2 = scores_b.max(dim=-1)
        order2 = stable_argsort(node_max2, descending=True)
        rank2 = torch.empty_like(order2).scatter_(1, order2, positions_b)
        merged_b = rank2 < r2
        slot_b = torch.where(merged_b, slot_a.gather(1, node_idx2), first_b + rank2 - r2)
    else:
        merged_b = torch.zeros(batch, nb, dtype=torch.bool, device=device)
        slot_b = first_b + positions_b
    dest_a = torch.where(merged_a, slot_b.gather(1, node_idx), slot_a)

    sa, sb = alternate_split(num_prefix, n - num_prefix)
    dest = torch.empty(batch, n, dtype=torch.long, device=device)
    dest[:, :num_prefix] = torch.arange(num_prefix, device=device)
    dest[:, num_prefix:][:, sa] = dest_a
    dest[:, num_prefix:][:, sb] = slot_b
    merged = torch.zeros(batch, n, dtype=torch.bool, device=device)
    merged[:, num_prefix:][:, sa] = merged_a
    merged[:, num_prefix:][:, sb] = merged_b
    return Assignment(dest=dest, n_out=n - r1 - r2, merged=merged, represented=True)


@register_reducer("mctf")
class MCTF(TokenReducer):
    """Fuse tokens ranked by similarity x informativeness x size, in both directions, with
    one-step-ahead attention.

    r:             tokens fused per reducing layer: an int, a fraction of the non-prefix tokens (< 1),
                   or a per-layer list
    layers:        reducing layers (0-based); default every layer but the first
    mode:          1 one-step-ahead attention (merge the block input and its attention map, reuse
                   the map), 2 recompute the attention after merging, 0 reduce after the MLP
    tau_sim, tau_info, tau_size: temperatures of the three criteria (0 leaves one out)
    bidirectional: r // 2 merges A -> B, then the rest B -> A on the same scores
    pooling:       "attn" weights by attention received x size (the paper), "size", "mean", "max"
    min_tokens:    never go below this many tokens (prefix included)
    consistency_weight, consistency_r_max, consistency_confidence: the fine-tuning consistency
                   loss (see `training_losses`): its weight, the teacher's r drawn from
                   {0 .. r_max - 1}, and the student probability above which a sample counts
    prop_attn:     proportional attention (log size added to the attention logits)
    trace_source:  keep the map from input patches to merged tokens
    """

    needs = frozenset({ATTN})
    # r < 1 is a fraction of the tokens: finer steps than integer counts on small models
    strength = (Strength("r", 0.0, 0.999, integer=False, larger_removes=True), REMOVAL_COUNT)

    def __init__(
        self,
        r: int | float | list[int] = 16,
        layers: list[int] | None = None,
        mode: int = 1,
        tau_sim: float = 1.0,
        tau_info: float = 20.0,
        tau_size: float = 40.0,
        bidirectional: bool = True,
        pooling: str = "attn",
        min_tokens: int = 10,
        prop_attn: bool = True,
        trace_source: bool = False,
        consistency_weight: float = 3.0,
        consistency_r_max: int | float = 8,
        consistency_confidence: float = 0.4,
    ):
        if isinstance(mode, bool) or mode not in MODES:
            raise ConfigError(f"{self.name}: mode={mode!r} is invalid; allowed: 0, 1, 2")
        if pooling not in POOLINGS:
            raise ConfigError(f"{self.name}: pooling={pooling!r} is invalid; allowed: {', '.join(map(repr, POOLINGS))}")
        check_flag(self.name, "bidirectional", bidirectional)
        check_number(self.name, "min_tokens", min_tokens, low=0, integer=True)
        schedule = Schedule(r=r, layers=layers, owner=self.name, fractional=True)
        super().__init__(schedule, prop_attn=prop_attn, trace_source=trace_source)
        self.mode = mode
        # 0 switches a criterion off; infinity makes it rank nothing
        self.taus = tuple(float(check_number(self.name, k, v, low=0))
                          for k, v in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)))
        self.bidirectional = bidirectional
        self.pooling = pooling
        self.min_tokens = min_tokens
        check_number(self.name, "consistency_weight", consistency_weight, low=0)
        check_number(self.name, "consistency_r_max", consistency_r_max, low=0, low_open=True)
        check_number(self.name, "consistency_confidence", consistency_confidence, low=0)
        self.consistency = (float(consistency_weight), consistency_r_max, float(consistency_confidence))
        self.num_prefix = 0

    def check_model(self, info) -> None:
        super().check_model(info)
        self.num_prefix = info.num_prefix

    def _resolved_schedule(self, num_layers: int) -> Schedule:
        if self.schedule.layers is None and not isinstance(self.schedule.r, list):
            return replace(self.schedule, layers=tuple(range(1, num_layers)))  # block 0 is never reduced
        return self.schedule

    def removal_counts(self, num_layers: int, num_tokens: int) -> list[int]:
        prefix, floor = self.num_prefix, self.min_tokens

        def cap(tokens: int) -> int:  # half of the non-prefix tokens, and keep `min_tokens` in all
            return min(tokens // 2, tokens + prefix - floor)

        return self._resolved_schedule(num_layers).removal_counts(num_layers, num_tokens, cap)

    @contextmanager
    def using_r(self, r: int | float | list[int]) -> Iterator[None]:
        """Run with another r (same layers and parameters) inside the block: the consistency
        loss's second pass."""
        saved = self.schedule
        self.schedule = replace(saved, r=r)
        try:
            yield
        finally:
            self.schedule = saved

    def training_losses(self, context) -> dict[str, Tensor]:
        """The token-reduction consistency terms of a fine-tuning step (the engine's loss hook):
        "ce_teacher", the cross-entropy of a second pass with a random smaller r, and "consistency",
        `consistency_weight` times the distance of the student's classifier feature to it."""
        weight, r_max, confidence = self.consistency
        labels = context.labels if context.targets.dim() == 1 else torch.stack([context.labels, context.labels.flip(0)], 1)
        student_feature = context.model.forward_head(context.tokens, pre_logits=True)
        terms = mctf_consistency_terms(context.model, context.images, context.targets, context.logits, student_feature,
                                       labels=labels, r_max=r_max, confidence=confidence, criterion=context.criterion)
        return {"ce_teacher": terms["ce_teacher"], "consistency": weight * terms["consistency"]}

    # --- one block -----------------------------------------------------------------------------
    def _match(self, x: Tensor, probs: Tensor, state: ReductionState, removal: int):
        received = probs.detach().mean(dim=(1, 2))  # attention each token receives: heads and queries
        assignment = mctf_matching(x, removal, state.num_prefix, received, state.sizes, *self.taus, self.bidirectional)
        state.add_macs(matching_macs(state.num_prefix, x.shape[1], x.shape[-1]) if self.taus[0] else 0)
        merge_mode, by_attention = POOLINGS[self.pooling]
        weights = received.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1) if by_attention else None
        return assignment, merge_mode, weights

    def block_forward(self, ops, x: Tensor, state: ReductionState, layer: int, removal: int) -> Tensor:
        if self.mode == 0:
            return self._reduce_after_mlp(ops, x, state, removal)
        n = x.shape[1]
        h = ops.attn_input(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == 1):
            probs = ops.attn_logits(*ops.attn_qk(h), state.attn_bias(x.dtype)).softmax(dim=-1)
        with reduce_scope():
            assignment, merge_mode, weights = self._match(x, probs, state, removal)
            if self.mode == 1:
                probs = combine_attention(probs, state.sizes, assignment, merge_mode, weights)
            x = state.merge(x, assignment, merge_mode, weights=weights)
        record = state.records[-1]
        record.probe_tokens, record.tokens_attn, record.probe_reused = n, x.shape[1], self.mode == 1
        if self.mode == 2:
            x, _ = ops.attention(x, state.attn_bias(x.dtype), frozenset())
        else:
            h = ops.attn_input(x)
            x = ops.attn_residual(x, ops.attn_output(probs, ops.attn_values(h), h))
        return ops.mlp(x)

    def _reduce_after_mlp(self, ops, x: Tensor, state: ReductionState, removal: int) -> Tensor:
        x, signals = ops.attention(x, state.attn_bias(x.dtype), self.needs)
        x = ops.mlp(x)
        state.records[-1].tokens_mlp = x.shape[1]
        with reduce_scope():
            assignment, merge_mode, weights = self._match(x, signals.attn, state, removal)
            return state.merge(x, assignment, merge_mode, weights=weights)


# --- the consistency loss ----------------------------------------------------------------------
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
    reducer = carried_reducer(model, MCTF, "mctf_consistency_loss")
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
    reducer = carried_reducer(model, MCTF, "mctf_consistency_loss")
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
