"""Selection rules of the vision-language-model token reducers, as pure functions on batched tensors.

Each function implements one method's rule and nothing of the model around it: the caller hands in
the attention maps, keys and hidden states the method reads (from the layer the method names) and
gets back which tokens to keep, or the new tokens. Where a method's published description and its
reference implementation differ, the difference is a parameter; the docstrings say which value
reproduces which.

Conventions shared by every function here:
- Sequences are `[B, N, ...]`; `image_mask` `[B, N]` bool marks the image tokens of a language-model
  sequence, and every sample has the same number `V` of them (LLaVA-1.5: 576), so that the kept
  count, and so the output shape, is the same for every sample.
- Vision-tower inputs cover all `N` tokens of the tower with `prefix` leading non-patch tokens (the
  CLS token: `prefix=1` for CLIP); patch `j` is token `prefix + j`.
- Ties are broken towards the lower index (the earlier token), so every selection is deterministic.
  Scores must be finite: a NaN would rank above every number (the order of `torch.sort`).
- Kept indices are returned in ascending order (kept tokens keep their sequence order) unless a
  function says otherwise.
- Similarities, norms and merges are computed in float32 (float64 inputs stay float64) and merged
  tokens are returned in the dtype of the hidden states.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.merge import Assignment, combine, scatter_sum, stable_argsort
from tokenreduce.errors import ConfigError, check_number, check_numbers, is_list

VISIONZIP_MERGES = ("mean", "target_plus_mean")
PRUMERGE_ORDERS = ("attention", "position")


# ------------------------------------------------------------------------------------------ checks


def _refuse(who: str, name: str, shown: str, allowed: str):
    raise ConfigError(f"{who}: {name}={shown} is invalid; allowed: {allowed}")


def _check_tensor(who: str, name: str, value, dims: tuple[int, ...], allowed: str,
                  kind: str = "float") -> Tensor:
    """`value` must be a tensor with one of `dims` dimensions, of `kind` ("float", "bool", "int")."""
    if not isinstance(value, Tensor):
        _refuse(who, name, f"{type(value).__name__}", allowed)
    integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    ok_kind = {"float": value.is_floating_point(), "bool": value.dtype == torch.bool, "int": integer}[kind]
    if value.dim() not in dims or not ok_kind:
        _refuse(who, name, f"a {value.dtype} tensor of shape {tuple(value.shape)}", allowed)
    return value


def _check_shape(who: str, name: str, value: Tensor, shape: tuple[int, ...], allowed: str):
    if tuple(value.shape) != tuple(shape):
        _refuse(who, name, f"a tensor of shape {tuple(value.shape)}", allowed)


def _wide(x: Tensor) -> Tensor:
    """`x` in float32, or float64 when it already is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _image_count(who: str, image_mask: Tensor, batch: int, n: int) -> int:
    """The number V of image tokens, which must be the same in every sample."""
    _check_tensor(who, "image_mask", image_mask, (2,), "a [B, N] bool tensor marking the image tokens",
                  "bool")
    _check_shape(who, "image_mask", image_mask, (batch, n), f"a bool tensor of shape ({batch}, {n})")
    counts = image_mask.sum(dim=1)
    if batch and bool((counts != counts[0]).any()):
        _refuse(who, "image_mask", f"a mask with {counts.tolist()} image tokens per sample",
                "the same number of image tokens in every sample")
    return int(counts[0]) if batch else 0


def _heads_mean(keys: Tensor) -> Tensor:
    """[B, N, C] from keys [B, N, C] (as given) or [B, H, N, d] (averaged over the heads)."""
    return keys.mean(dim=1) if keys.dim() == 4 else keys


def _heads_concat(keys: Tensor) -> Tensor:
    """[B, N, C] from keys [B, N, C] (as given) or [B, H, N, d] (heads side by side: C = H * d)."""
    if keys.dim() == 4:
        b, h, n, d = keys.shape
        return keys.permute(0, 2, 1, 3).reshape(b, n, h * d)
    return keys


# ------------------------------------------------------------------------- shared selection pieces


def attention_scores(attn: Tensor, query: int | list[int] | Tensor = -1) -> Tensor:
    """The score of every key: the attention it receives from one query, averaged over the heads.

    `score[b, j] = (1/H) * sum_h attn[b, h, q, j]` (FastV, arXiv 2403.06764, Sec. 4: the attention
    the last token pays at layer K-1, averaged over heads; PyramidDrop, arXiv 2410.17247, Sec. 3.2:
    the last instruction token's attention at the stage's layer).

    attn:  [B, H, Q, N] attention probabilities (rows of queries, columns of keys).
    query: which query row: an int (negative counts from the end; -1, the default, is the last
           token); a list of ints, whose rows are averaged (PyramidDrop's training mode ranks by the
           mean over the tokens before each answer); or a [B] integer tensor, one row per sample
           (the last real token of each sample under right padding).
    Returns [B, N] float32 (float64 for float64 input).
    """
    who = "attention_scores"
    _check_tensor(who, "attn", attn, (4,), "a [B, H, Q, N] float tensor of attention probabilities")
    b, h, q, n = attn.shape
    rows_allowed = f"a row index in [{-q}, {q - 1}] (attn has {q} query rows)"
    if isinstance(query, Tensor):
        _check_tensor(who, "query", query, (1,), f"a [B] integer tensor of row indices in [0, {q - 1}]",
                      "int")
        _check_shape(who, "query", query, (b,), f"an integer tensor of shape ({b},)")
        if b and (int(query.min()) < -q or int(query.max()) >= q):
            _refuse(who, "query", f"a tensor with values {query.tolist()}", rows_allowed)
        rows = attn.gather(2, (query % q).view(b, 1, 1, 1).expand(b, h, 1, n)).squeeze(2)
    elif is_list(query):
        rows_list = check_numbers(who, "query", query, low=-q, high=q - 1, integer=True)
        if not rows_list:
            _refuse(who, "query", "[]", "a non-empty list of row indices")
        rows = attn[:, :, rows_list, :].mean(dim=2)
    else:
        check_number(who, "query", query, low=-q, high=q - 1, integer=True)
        rows = attn[:, :, query, :]
    return _wide(rows).mean(dim=1)


def top_k_in_order(scores: Tensor, k: int, candidates: Tensor | None = None) -> Tensor:
    """The indices [B, k] of the k highest scores among the candidate positions, in ascending order.

    Among the positions j with `candidates[b, j]` (all positions when `candidates` is None), take
    the k with the largest `scores[b, j]`; equal scores are taken lower index first. The chosen
    indices are returned sorted ascending, so kept tokens keep their sequence order.

    scores:     [B, N] float.
    k:          0 <= k <= the fewest candidates in any sample.
    candidates: [B, N] bool, e.g. the image tokens; None: every position.
    """
    who = "top_k_in_order"
    _check_tensor(who, "scores", scores, (2,), "a [B, N] float tensor")
    b, n = scores.shape
    available = n
    if candidates is not None:
        _check_tensor(who, "candidates", candidates, (2,), "a [B, N] bool tensor, or None", "bool")
        _check_shape(who, "candidates", candidates, (b, n), f"a bool tensor of shape ({b}, {n}), or None")
        available = int(candidates.sum(dim=1).min()) if b else n
    check_number(who, "k", k, low=0, high=available, integer=True)
    order = stable_argsort(scores, descending=True)
    if candidates is not None:  # candidates first; a stable sort keeps each group in score order
        order = order.gather(1, stable_argsort(candidates.gather(1, order).byte(), descending=True))
    return order[:, :k].sort(dim=1).values


def sequence_keep(image_mask: Tensor, kept_image: Tensor) -> Tensor:
    """Every kept position of the sequence, ascending: all non-image tokens and the kept image tokens.

    image_mask: [B, N] bool; kept_image: [B, k] positions of kept image tokens (any order, no repeats).
    Returns [B, N - V + k] long (the same count in every sample, as V and k are).
    """
    b, n = image_mask.shape
    keep = (~image_mask).scatter(1, kept_image, True)
    return keep.nonzero()[:, 1].view(b, -1)


# ------------------------------------------------------------------------------ FastV, PyramidDrop


def fastv_keep_count(num_visual: int, prune_ratio: float) -> int:
    """Image tokens FastV keeps: `round(num_visual * (1 - prune_ratio))`.

    Python's `round` (halves to even), as the reference implementation computes its count from the
    pruned share R (FastV's K=2, R=50% on 576 tokens keeps 288; R=75% keeps 144).
    """
    who = "fastv_keep_count"
    check_number(who, "num_visual", num_visual, low=0, integer=True)
    check_number(who, "prune_ratio", prune_ratio, low=0, high=1)
    return round(num_visual * (1 - prune_ratio))


def fastv_keep(attn: Tensor, image_mask: Tensor, keep: int, query: int | list[int] | Tensor = -1) -> Tensor:
    """Positions FastV keeps from layer K on: every non-image token and the `keep` image tokens
    with the highest `attention_scores(attn, query)`.

    FastV (arXiv 2403.06764, Sec. 4): after layer K-1, rank the image tokens by the attention the
    last token pays them in that layer, averaged over heads, and drop all but the top ones for
    layers K.. (K=2 by default). The reference keeps the original position ids of the kept tokens.
    PyramidDrop applies the same rule at each stage (its layers 8, 16, 24) with the scores of the
    last instruction token, to the image tokens still present, keeping `pyramid_schedule`'s counts.

    attn:       [B, H, Q, N] attention probabilities of layer K-1 (Q may be 1: the query row only).
    image_mask: [B, N] bool, the same number V of image tokens per sample.
    keep:       image tokens kept, 0 <= keep <= V (see `fastv_keep_count`).
    Returns [B, N - V + keep] long, ascending.
    """
    who = "fastv_keep"
    _check_tensor(who, "attn", attn, (4,), "a [B, H, Q, N] float tensor of attention probabilities")
    b, _, _, n = attn.shape
    v = _image_count(who, image_mask, b, n)
    check_number(who, "keep", keep, low=0, high=v, integer=True)
    chosen = top_k_in_order(attention_scores(attn, query), keep, image_mask)
    return sequence_keep(image_mask, chosen)


def pyramid_schedule(num_visual: int, layers: list[int], ratio: float | list[float] = 0.5) -> list[int]:
    """Image tokens PyramidDrop keeps in each stage: entry s is the count from layer `layers[s]` on
    (before `layers[0]` all `num_visual` are there).

    PyramidDrop (arXiv 2410.17247, Sec. 3.2): at the end of each stage the image tokens are ranked
    and a fraction lambda of those remaining is kept, so stage s (from 1) holds
    `floor(num_visual * lambda**s)`. The reference takes the cumulative ratios as a list
    ([0.5, 0.25, 0.125] at layers [8, 16, 24] for LLaVA-1.5: 576 -> 288, 144, 72) and floors
    `num_visual * ratio_s`; a list `ratio` is that form.
    Rounding: floor of the exact product, each ratio read as the decimal number it is written as
    (0.7 is 7/10, not the binary float just below it), so 100 tokens at lambda=0.7 keep 70, 49, 34.
    Each stage selects with `fastv_keep`. The reference ranks at layer l with the attention layer l
    itself would compute on the stage's input (its query and key projections, rotary embedding,
    causal softmax), the row of the last instruction token, averaged over heads; after each drop
    it renumbers the positions of the remaining tokens 0, 1, ... (FastV and DART keep the original
    positions of the kept tokens).

    ratio: lambda in (0, 1], or a list of cumulative ratios in (0, 1], one per layer, non-increasing.
    """
    who = "pyramid_schedule"
    check_number(who, "num_visual", num_visual, low=0, integer=True)
    layer_list = check_numbers(who, "layers", layers, low=0, integer=True)
    if any(later <= earlier for earlier, later in zip(layer_list, layer_list[1:], strict=False)):
        _refuse(who, "layers", repr(layers), "strictly increasing layer indices")
    if is_list(ratio):
        ratios = check_numbers(who, "ratio", ratio, low=0, high=1, low_open=True)
        if len(ratios) != len(layer_list) or any(b > a for a, b in zip(ratios, ratios[1:], strict=False)):
            _refuse(who, "ratio", repr(ratio), f"a non-increasing list of {len(layer_list)} cumulative "
                    "ratios in (0, 1] (one per layer), or one ratio in (0, 1]")
        cumulative = [Fraction(repr(float(r))) for r in ratios]
    else:
        check_number(who, "ratio", ratio, low=0, high=1, low_open=True)
        step = Fraction(repr(float(ratio)))
        cumulative = [step ** (s + 1) for s in range(len(layer_list))]
    return [math.floor(num_visual * r) for r in cumulative]


# ----------------------------------------------------------------------------------------- VisionZip


def visionzip(cls_attention: Tensor, keys: Tensor, hidden: Tensor, dominant: int, contextual: int, *,
              prefix: int = 1, keep_prefix: bool = True, merge: str = "mean") -> tuple[Tensor, Assignment]:
    """VisionZip (arXiv 2412.04467, Sec. 4): dominant tokens by CLS attention, the rest merged into a
    few contextual tokens; all signals from the vision tower's feature layer (LLaVA: layer -2).

    1. Dominant: the `d` patch tokens with the largest CLS attention summed over heads,
       `s_j = sum_h A[h, cls, j]` (the CLS column itself excluded), where `d = dominant - prefix`
       with `keep_prefix` (the prefix tokens count among the dominant ones and come first, as in the
       reference: its `dominant=54` is CLS + 53 patches) and `d = dominant` without.
    2. Contextual: the M remaining patches, in sequence order; every `step`-th of them is a target,
       `step = max(1, M // contextual)`, the first `contextual` such (positions 0, step, 2 step...
       of the remaining); every other remaining patch goes to the target whose key it is most
       similar to, `argmax_t <k_i, k_t>` of L2-normalised keys (the reference's keys: the layer's
       key projection averaged over heads, then normalised; ties to the earlier target).
    3. Merge `merge`: "mean", each contextual token is the plain mean of its target and the patches
       assigned to it (the paper's averaging); "target_plus_mean", the target plus the mean of the
       patches assigned to it (a target with none stays itself): what the reference code computes.
    `contextual=0` keeps the dominant tokens only (the rest dropped). `prefix=0` serves a tower
    without a CLS token, given per-token scores in place of the CLS row.

    cls_attention: [B, H, N] the CLS query's attention row over all N tokens, per head (summed
                   here), or [B, N] already reduced over heads.
    keys:          [B, N, C] (as given) or [B, H, N, d] (averaged over heads here).
    hidden:        [B, N, D] the features merged (the feature layer's output).
    Returns the new tokens [B, dominant + contextual, D] (`dominant - prefix + contextual` patches
    plus the prefix with `keep_prefix`): prefix tokens, dominant tokens in sequence order, then the
    contextual tokens in their targets' order; and the `Assignment` of the N inputs to them
    (`merged` marks the patches absorbed into a target; dropped tokens have slot `n_out`).
    """
    who = "visionzip"
    _check_tensor(who, "hidden", hidden, (3,), "a [B, N, D] float tensor")
    b, n, _ = hidden.shape
    _check_tensor(who, "cls_attention", cls_attention, (2, 3), "a [B, H, N] or [B, N] float tensor")
    _check_shape(who, "cls_attention", cls_attention, (b, *cls_attention.shape[1:-1], n),
                 f"a tensor of shape ({b}, H, {n}) or ({b}, {n})")
    _check_tensor(who, "keys", keys, (3, 4), "a [B, N, C] or [B, H, N, d] float tensor")
    if keys.shape[0] != b or keys.shape[-2] != n:
        _refuse(who, "keys", f"a tensor of shape {tuple(keys.shape)}", f"({b}, {n}, C) or ({b}, H, {n}, d)")
    check_number(who, "prefix", prefix, low=0, high=n, integer=True)
    if not isinstance(keep_prefix, bool):
        _refuse(who, "keep_prefix", repr(keep_prefix), "true or false")
    if merge not in VISIONZIP_MERGES:
        _refuse(who, "merge", repr(merge), ", ".join(map(repr, VISIONZIP_MERGES)))
    kept_prefix = prefix if keep_prefix else 0
    check_number(who, "dominant", dominant, low=kept_prefix, high=n - prefix + kept_prefix, integer=True)
    n_dom = dominant - kept_prefix
    m = n - prefix - n_dom
    check_number(who, "contextual", contextual, low=0, high=m, integer=True)

    scores = _wide(cls_attention)
    scores = scores.sum(dim=1) if scores.dim() == 3 else scores
    dom = top_k_in_order(scores[:, prefix:], n_dom) + prefix
    rest_mask = torch.ones(b, n, dtype=torch.bool, device=hidden.device).scatter(1, dom, False)
    rest_mask[:, :prefix] = False
    rest = rest_mask.nonzero()[:, 1].view(b, m)  # remaining patches, ascending

    step = max(1, m // contextual) if contextual else 1
    target_at = list(range(0, m, step))[:contextual]
    other_at = sorted(set(range(m)) - set(target_at)) if contextual else []
    targets, others = rest[:, target_at], rest[:, other_at]

    first_target = kept_prefix + n_dom
    n_out = first_target + contextual
    slot = torch.arange(n_out, device=hidden.device).expand(b, n_out)
    dest = torch.full((b, n), n_out, dtype=torch.long, device=hidden.device)
    dest[:, :kept_prefix] = slot[:, :kept_prefix]
    dest.scatter_(1, dom, slot[:, kept_prefix:first_target])
    dest.scatter_(1, targets, slot[:, first_target:])
    if other_at:
        metric = F.normalize(_wide(_heads_mean(keys)), dim=-1)
        c = metric.shape[-1]
        similarity = metric.gather(1, others.unsqueeze(-1).expand(-1, -1, c)) @ \
            metric.gather(1, targets.unsqueeze(-1).expand(-1, -1, c)).transpose(1, 2)
        dest.scatter_(1, others, similarity.argmax(dim=-1) + first_target)  # argmax: the first maximum
    merged = torch.zeros(b, n, dtype=torch.bool, device=hidden.device).scatter_(1, others, True)
    assignment = Assignment(dest=dest, n_out=n_out, merged=merged if other_at else None,
                            represented=keep_prefix and (contextual > 0 or m == 0))

    if merge == "mean":
        tokens, _ = combine(hidden, None, assignment, mode="mean")
        return tokens, assignment
    represented, _ = combine(hidden, None, assignment, mode="prune")
    member_dest = dest.masked_fill(~merged, n_out)
    member_sum = scatter_sum(_wide(hidden), member_dest, n_out)
    member_count = scatter_sum(torch.ones_like(hidden[..., :1], dtype=member_sum.dtype), member_dest, n_out)
    tokens = _wide(represented) + member_sum / member_count.clamp_min(1)
    return tokens.to(hidden.dtype), assignment


# ------------------------------------------------------------------------------------- LLaVA-PruMerge


class PrunedTokens(NamedTuple):
    """Tokens whose count differs per sample, padded to the largest count.

    tokens: [B, n, D] each sample's tokens first, then zero rows.
    valid:  [B, n] bool, True for a real token (a prefix of every row: `valid[b].sum()` tokens).
    index:  [B, n] long, the input position each token stands for (its kept token's position);
            -1 for a token made of many (PruMerge's extra token) and for padding.
    """

    tokens: Tensor
    valid: Tensor
    index: Tensor


def iqr_outlier_count(scores: Tensor) -> Tensor:
    """Per sample, the number of scores above `Q3 + 1.5 (Q3 - Q1)` (strictly), [B] long.

    Q1 and Q3 are the 25th and 75th percentiles with linear interpolation between order
    statistics (numpy's `percentile` default, which the PruMerge reference uses), of each row of
    `scores` [B, N] alone.
    """
    who = "iqr_outlier_count"
    _check_tensor(who, "scores", scores, (2,), "a [B, N] float tensor with N >= 1")
    if scores.shape[1] == 0:
        _refuse(who, "scores", "a tensor with 0 columns", "a [B, N] float tensor with N >= 1")
    s = _wide(scores)
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype, device=s.device), dim=1)
    return (s > (q3 + 1.5 * (q3 - q1)).unsqueeze(1)).sum(dim=1)


def prumerge(cls_attention: Tensor, keys: Tensor, hidden: Tensor, plus: bool = False, *, prefix: int = 1,
             neighbours: int = 32, add_self: bool = True, normalise_weights: bool = False,
             extra_token: bool = True, order: str = "attention", min_keep: int = 1) -> PrunedTokens:
    """LLaVA-PruMerge (arXiv 2403.15388, Sec. 3, Algorithm 1) and PruMerge+ (`plus=True`).

    With `a_j` the CLS attention of patch j, `y_j` its features and `k_j` its key:
    1. Adaptive count: `n_keep = max(iqr_outlier_count(a), min_keep)`, per sample (the reference
       pools the whole batch into one count; it runs at batch 1). The kept set is the `n_keep`
       patches of largest `a_j` (ties: lower index first).
    2. PruMerge+ also keeps spatially uniform samples: patches 0, s, 2s, ... below `N' - 1` (N'
       patches; the reference's fixed bound 575 for 576), `s = max(1, (N' // max(n_keep, 1)) // 3)`,
       those not already kept, after them.
    3. Each kept patch i is updated from its `neighbours` nearest other patches J_i (kept or not)
       by cosine similarity of keys (ties: lower index first):
       `y'_i = [y_i if add_self] + sum_{j in J_i} w_j y_j`, `w_j = a_j`, or with
       `normalise_weights` `w_j = a_j / sum_{J_i} a`. The reference uses add_self=True,
       normalise_weights=False (its division is commented out), neighbours=32; the paper's
       Algorithm 1 writes the update as the attention-weighted sum of the neighbours.
    4. `extra_token`: one more token, `sum_{j not kept} a_j y_j`, appended (the reference's), where
       some patch is not kept.

    The reference's signals: `a` is the CLS row of `softmax(q k^T / sqrt(C))` from the last
    vision layer's query and key projections taken whole (one head of width C, not the model's
    heads), the CLS column dropped after the softmax; `k` that key projection (heads side by
    side); `y` the feature layer's (-2) patch outputs.

    cls_attention: [B, N] the attention row over all N tokens (the prefix columns are not used).
    keys:          [B, N, C], or [B, H, N, d] (heads concatenated here, C = H * d).
    hidden:        [B, N, D].
    order:         "attention": the top patches by descending attention, then PruMerge+'s samples
                   ascending (the reference's order); "position": all kept patches ascending.
                   The extra token is last either way.
    Returns `PrunedTokens`: counts differ per sample, so a padded [B, n, D] tensor with a [B, n]
    validity mask (a prefix of each row) and each token's input position. A batched model
    integration can project all samples at once and splice `valid[b].sum()` tokens per sample
    into its placeholder run; a list would force a per-sample loop through the projector.
    """
    who = "prumerge"
    _check_tensor(who, "hidden", hidden, (3,), "a [B, N, D] float tensor")
    b, n, d = hidden.shape
    _check_tensor(who, "cls_attention", cls_attention, (2,), "a [B, N] float tensor (one attention row)")
    _check_shape(who, "cls_attention", cls_attention, (b, n), f"a float tensor of shape ({b}, {n})")
    _check_tensor(who, "keys", keys, (3, 4), "a [B, N, C] or [B, H, N, d] float tensor")
    if keys.shape[0] != b or keys.shape[-2] != n:
        _refuse(who, "keys", f"a tensor of shape {tuple(keys.shape)}", f"({b}, {n}, C) or ({b}, H, {n}, d)")
    for name, flag in (("plus", plus), ("add_self", add_self), ("normalise_weights", normalise_weights),
                       ("extra_token", extra_token)):
        if not isinstance(flag, bool):
            _refuse(who, name, repr(flag), "true or false")
    if order not in PRUMERGE_ORDERS:
        _refuse(who, "order", repr(order), ", ".join(map(repr, PRUMERGE_ORDERS)))
    check_number(who, "prefix", prefix, low=0, high=n - 1, integer=True)
    m = n - prefix
    check_number(who, "neighbours", neighbours, low=0, high=m - 1, integer=True)
    check_number(who, "min_keep", min_keep, low=0, high=m, integer=True)

    a = _wide(cls_attention[:, prefix:])
    y = _wide(hidden[:, prefix:])
    metric = F.normalize(_wide(_heads_concat(keys)[:, prefix:]), dim=-1)
    n_keep = iqr_outlier_count(a).clamp(min=min_keep)  # [B]
    pos = torch.arange(m, device=hidden.device).expand(b, m)
    by_score = stable_argsort(a, descending=True)
    rank = torch.empty_like(by_score).scatter_(1, by_score, pos)
    top = rank < n_keep.unsqueeze(1)
    kept = top
    if plus:
        stride = ((m // n_keep.clamp(min=1)) // 3).clamp(min=1)
        kept = top | ((pos % stride.unsqueeze(1) == 0) & (pos < m - 1))
    count = kept.sum(dim=1)
    if order == "attention":
        sort_key = torch.where(top, rank, torch.where(kept, m + pos, 2 * m + pos))
    else:
        sort_key = torch.where(kept, pos, m + pos)
    width = int(count.max()) if b else 0
    chosen = stable_argsort(sort_key)[:, :width]  # [B, width]
    valid = torch.arange(width, device=hidden.device) < count.unsqueeze(1)

    base = y.gather(1, chosen.unsqueeze(-1).expand(-1, -1, d))
    chosen_keys = metric.gather(1, chosen.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
    similarity = chosen_keys @ metric.transpose(1, 2)  # [B, width, N']
    similarity.scatter_(2, chosen.unsqueeze(-1), float("-inf"))  # a patch is not its own neighbour
    near = stable_argsort(similarity, descending=True)[..., :neighbours]  # [B, width, neighbours]
    weights = a.gather(1, near.flatten(1)).view_as(near)
    if normalise_weights:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    pull = torch.zeros(b, width, m, dtype=y.dtype, device=y.device).scatter_(2, near, weights) @ y
    out = (base + pull if add_self else pull) * valid.unsqueeze(-1)
    index = torch.where(valid, chosen + prefix, -1)
    if extra_token:
        rest = ((a * ~kept).unsqueeze(1) @ y)  # [B, 1, D]
        out = torch.cat([out, out.new_zeros(b, 1, d)], dim=1).scatter(
            1, count.view(b, 1, 1).expand(b, 1, d), rest)
        index = torch.cat([index, index.new_full((b, 1), -1)], dim=1)
        # no extra token where every patch is kept (PruMerge+'s samples cover a small grid): nothing is left
        # to sum, and the image would hold more tokens than its patches
        extra = (count < m).long()
        valid = torch.arange(width + 1, device=hidden.device) < (count + extra).unsqueeze(1)
    return PrunedTokens(out.to(hidden.dtype), valid, index)


# ---------------------------------------------------------------------------------------------- DART


def dart_keep_count(keep: int, image_pivots: int = 4, text_pivots: int = 4) -> int:
    """Image tokens `dart_keep` keeps: `image_pivots + P * (keep // P)`, P = image_pivots + text_pivots.

    The reference gives each of the P pivots a quota of `keep // P` tokens and keeps the image
    pivots on top, so its 128-token setting (4 + 4 pivots) keeps 4 + 8 * 16 = 132 image tokens.
    """
    who = "dart_keep_count"
    check_number(who, "keep", keep, low=0, integer=True)
    check_number(who, "image_pivots", image_pivots, low=0, integer=True)
    check_number(who, "text_pivots", text_pivots, low=0, integer=True)
    pivots = image_pivots + text_pivots
    if pivots == 0:
        _refuse(who, "image_pivots + text_pivots", "0", "at least one pivot")
    return image_pivots + pivots * (keep // pivots)


def dart_keep(tokens: Tensor, keys: Tensor, image_mask: Tensor, keep: int, image_pivots: int = 4,
              text_pivots: int = 4, *, text_mask: Tensor | None = None, norm_p: float = 1.0) -> Tensor:
    """Positions DART keeps from layer K on (arXiv 2502.11494, Sec. 3): pivots, then per pivot the
    image tokens least similar to it.

    1. Pivots: the `image_pivots` image tokens and the `text_pivots` text tokens with the largest
       key norm `||k_j||_p` (the reference: L1 norm, p=1, of layer K-1's keys after the rotary
       embedding with the heads side by side; text tokens are those after the image).
    2. Duplication: each pivot in turn (in sequence order; the reference walks a Python set, whose
       order is that of the positions modulo its table size) takes the `quota = keep // P` image
       tokens least similar to it, `argmin cos(x_pivot, x_j)`, among the image tokens that are
       neither image pivots nor taken by an earlier pivot (ties: lower index first). The reference
       compares layer K-1's output hidden states after the model's final norm.
    3. Kept: the image pivots and every taken token (text pivots are text and stay anyway);
       `dart_keep_count(keep, image_pivots, text_pivots)` of them. Non-image tokens are all kept.

    tokens:     [B, N, D] the states compared by cosine similarity.
    keys:       [B, N, C] or [B, H, N, d] (heads concatenated here) for the pivot norms.
    image_mask: [B, N] bool, the same number V of image tokens per sample.
    keep:       the budget split into quotas (the reference's `max_num_trunction`, 128 by default).
    text_mask:  [B, N] bool, the text pivot candidates; None: the tokens after the last image token.
    norm_p:     the norm's order p > 0 (float("inf") allowed).
    Returns [B, N - V + dart_keep_count(...)] long, ascending.
    """
    who = "dart_keep"
    _check_tensor(who, "tokens", tokens, (3,), "a [B, N, D] float tensor")
    b, n, _ = tokens.shape
    _check_tensor(who, "keys", keys, (3, 4), "a [B, N, C] or [B, H, N, d] float tensor")
    if keys.shape[0] != b or keys.shape[-2] != n:
        _refuse(who, "keys", f"a tensor of shape {tuple(keys.shape)}", f"({b}, {n}, C) or ({b}, H, {n}, d)")
    v = _image_count(who, image_mask, b, n)
    n_kept = dart_keep_count(keep, image_pivots, text_pivots)
    check_number(who, "image_pivots", image_pivots, low=0, high=v, integer=True)
    if n_kept > v:
        _refuse(who, "keep", repr(keep), f"a budget whose kept count ({image_pivots} pivots + quotas = "
                f"{n_kept}) is at most the {v} image tokens")
    check_number(who, "norm_p", norm_p, low=0, low_open=True)
    if text_mask is None:
        position = torch.arange(n, device=tokens.device)
        last_image = torch.where(image_mask, position, -1).amax(dim=1, keepdim=True)
        text_mask = position > last_image
    else:
        _check_tensor(who, "text_mask", text_mask, (2,), "a [B, N] bool tensor, or None", "bool")
        _check_shape(who, "text_mask", text_mask, (b, n), f"a bool tensor of shape ({b}, {n}), or None")
    fewest_text = int(text_mask.sum(dim=1).min()) if b else 0
    check_number(who, "text_pivots", text_pivots, low=0, high=fewest_text, integer=True)

    norms = torch.linalg.vector_norm(_wide(_heads_concat(keys)), ord=norm_p, dim=-1)
    image_piv = top_k_in_order(norms, image_pivots, image_mask)
    pivots = torch.cat([image_piv, top_k_in_order(norms, text_pivots, text_mask)], dim=1).sort(dim=1).values
    quota = keep // (image_pivots + text_pivots)
    x = F.normalize(_wide(tokens), dim=-1)
    available = image_mask.scatter(1, image_piv, False)
    kept = torch.zeros_like(image_mask).scatter_(1, image_piv, True)
    for p in range(pivots.shape[1]):
        pivot = x.gather(1, pivots[:, p].view(b, 1, 1).expand(-1, 1, x.shape[-1]))  # [B, 1, D]
        similarity = (x @ pivot.transpose(1, 2)).squeeze(-1)  # [B, N]
        taken = top_k_in_order(-similarity, quota, available)
        available.scatter_(1, taken, False)
        kept.scatter_(1, taken, True)
    return (~image_mask | kept).nonzero()[:, 1].view(b, -1)


# ------------------------------------------------------------------------------------------ SparseVLM
#
# SparseVLM (arXiv 2410.04417, v1; reference code: github.com/Gumpest/SparseVLMs, v1 of October 2024).
# At each pruning layer l of the language model: the attention of a few relevant text tokens (the
# raters) to the visual tokens rates them; the number kept follows the rank of that raters-by-visual
# matrix; the best-rated pruned tokens are clustered and each cluster is recycled as one token.
#
# The text tokens of a sample are given as rows `text` [B, T]: the positions of its text tokens
# (the real prompt tokens after its last image token), ascending, then -1 where a sample has fewer
# than T. Counts of visual tokens may differ per sample (the count adapts to each sample's rank), so
# these functions, unlike the ones above, accept a different number of image tokens per sample.


class SparseVLMKeep(NamedTuple):
    """What one SparseVLM stage keeps, per sample (counts differ per sample).

    index:    [B, M] long, the positions that stay, ascending, after `M - count[b]` left padding slots
              marked -1 (M: the most any sample keeps).
    hidden:   [B, M, D] the states of the kept positions: `hidden[b, index]`, except at a recycled
              token's position (its cluster's centre), which holds the cluster's mean; zeros at -1.
    recycled: [B, M] bool, the positions holding a recycled token.
    visual:   [B] long, image tokens kept by rating (recycled tokens not counted).
    clusters: [B] long, recycled tokens.
    rank:     [B] long, the rank of each sample's raters-by-visual attention matrix.
    """

    index: Tensor
    hidden: Tensor
    recycled: Tensor
    visual: Tensor
    clusters: Tensor
    rank: Tensor


def _decimal(value: float) -> Fraction:
    """`value` as the decimal number it is written as (0.3 is 3/10, not the binary float below it)."""
    return Fraction(repr(float(value)))


def _check_rows(who: str, text: Tensor, batch: int, n: int) -> Tensor:
    """`text` [B, T] long: each row's valid entries (>= 0) first, ascending positions in [0, N); then -1."""
    _check_tensor(who, "text", text, (2,), "a [B, T] integer tensor of text positions, -1 after each sample's last",
                  "int")
    if text.shape[0] != batch:
        _refuse(who, "text", f"a tensor of shape {tuple(text.shape)}", f"an integer tensor of shape ({batch}, T)")
    valid = text >= 0
    ok = bool((text < n).all()) and bool((text >= -1).all())
    ok = ok and bool((valid[:, 1:] <= valid[:, :-1]).all())  # the valid entries first
    ok = ok and bool(((text[:, 1:] > text[:, :-1]) | ~valid[:, 1:]).all())  # ascending
    if not ok:
        _refuse(who, "text", f"a tensor with values {text.tolist()}",
                f"ascending positions in [0, {n - 1}] per row, then -1 (the valid entries first)")
    return valid


def text_relevance(embeddings: Tensor, image_mask: Tensor, text: Tensor) -> Tensor:
    """How much each text token relates to the image, from the language model's input states [B, T].

    SparseVLM's relevant-text selection (Sec. 3.2 of v1; the reference code computes it once, on
    the embeddings entering the language model): with `h_v` the states of the V image tokens and
    `h_t` those of the T text tokens of a sample,
        `r_t = (1/V) sum_v softmax_t(h_v . h_t)`,
    the softmax over the sample's text tokens (rows of `text`), then averaged over its image tokens.
    The reference takes the dot product as it is (no 1/sqrt(D)). Computed in float32 (float64
    stays). Entries of padding rows (-1) are 0; a sample without image tokens gets 0 everywhere.

    embeddings: [B, N, D]; image_mask: [B, N] bool (any number per sample); text: [B, T] rows.
    """
    who = "text_relevance"
    _check_tensor(who, "embeddings", embeddings, (3,), "a [B, N, D] float tensor")
    b, n, d = embeddings.shape
    _check_tensor(who, "image_mask", image_mask, (2,), "a [B, N] bool tensor marking the image tokens", "bool")
    _check_shape(who, "image_mask", image_mask, (b, n), f"a bool tensor of shape ({b}, {n})")
    valid = _check_rows(who, text, b, n)
    x = _wide(embeddings)
    t = x.gather(1, text.clamp_min(0).unsqueeze(-1).expand(-1, -1, d))  # [B, T, D]
    logits = (x @ t.transpose(1, 2)).masked_fill(~valid.unsqueeze(1), float("-inf"))  # [B, N, T]
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a sample without text rows: zeros
    image = image_mask.to(probs.dtype).unsqueeze(-1)
    count = image.sum(dim=1).clamp_min(1)  # [B, 1]
    return ((probs * image).sum(dim=1) / count).masked_fill(~valid, 0.0)


def attention_relevance(text_attn: Tensor, image_mask: Tensor, text: Tensor) -> Tensor:
    """How much each text token attends to the image at a layer, [B, T]: `r_t = (1/V) sum_v A[t, v]`,
    `A = (1/H) sum_h text_attn[:, h]` (the attention rows of the text tokens, averaged over heads),
    v over the sample's image tokens. A variant of SparseVLM's rater selection that reads the
    pruning layer's own attention instead of the input embeddings. 0 at padding rows.

    text_attn: [B, H, T, N] attention probabilities of the rows `text` [B, T]; image_mask: [B, N] bool.
    """
    who = "attention_relevance"
    _check_tensor(who, "text_attn", text_attn, (4,), "a [B, H, T, N] float tensor of attention probabilities")
    b, _, t, n = text_attn.shape
    _check_tensor(who, "image_mask", image_mask, (2,), "a [B, N] bool tensor marking the image tokens", "bool")
    _check_shape(who, "image_mask", image_mask, (b, n), f"a bool tensor of shape ({b}, {n})")
    valid = _check_rows(who, text, b, n)
    _check_shape(who, "text", text, (b, t), f"an integer tensor of shape ({b}, {t}) (one per row of text_attn)")
    a = _wide(text_attn).mean(dim=1)  # [B, T, N]
    image = image_mask.to(a.dtype).unsqueeze(1)
    count = image.sum(dim=-1).clamp_min(1)  # [B, 1]
    return ((a * image).sum(dim=-1) / count).masked_fill(~valid, 0.0)


def select_raters(relevance: Tensor, text: Tensor) -> Tensor:
    """The raters [B, T] bool: the text rows whose relevance is at or above the mean relevance of the
    sample's text rows (`r_t >= (1/T_b) sum_t r_t`; SparseVLM Sec. 3.2). The reference code compares
    strictly (`>`), which selects no rater when every text token is equally relevant (one text token);
    here such a sample rates with all of them. Padding rows (-1) are never raters.

    relevance: [B, T] float (text_relevance or attention_relevance); text: [B, T] rows.
    """
    who = "select_raters"
    _check_tensor(who, "relevance", relevance, (2,), "a [B, T] float tensor")
    _check_tensor(who, "text", text, (2,), "a [B, T] integer tensor of text positions, -1 after each sample's last",
                  "int")
    _check_shape(who, "text", text, tuple(relevance.shape), f"an integer tensor of shape {tuple(relevance.shape)}")
    valid = text >= 0
    r = _wide(relevance).masked_fill(~valid, 0.0)
    mean = r.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp_min(1)
    return valid & (r >= mean)


def sparsevlm_keep_count(num_visual: int, rank: int, scale: float = 13.5, bias: float = 0.0,
                         keep: int | None = None) -> int:
    """Image tokens SparseVLM keeps at a layer, given V = `num_visual` and the rank of the raters-by-
    visual attention matrix: `min(floor(scale * rank + bias), V, keep)` (at least 0); all V when
    `rank >= V` (the matrix has no redundancy: the reference skips the layer), unless `keep` is lower.

    The reference code (v1) keeps `min(int(rank * scale + bias), V - 1)` top-rated tokens, always
    pruning at least one (here `V` itself is allowed: nothing pruned); its settings for an average of
    192 / 128 / 64 visual tokens over LLaVA-1.5-7B's 32 layers are scale=13.5, bias=0 / scale=9,
    bias=6 / scale=0.8, bias=0. `scale=0` with `bias=k` keeps exactly k (at most V); `keep` caps
    the adaptive count (e.g. the fixed per-layer budgets of the reference's v1.5: 300, 200, 110 at
    layers 2, 6, 15 for 192). Products are exact in the decimal numbers as written (0.8 is 4/5).
    """
    who = "sparsevlm_keep_count"
    check_number(who, "num_visual", num_visual, low=0, integer=True)
    check_number(who, "rank", rank, low=0, integer=True)
    check_number(who, "scale", scale, low=0, finite=True)
    check_number(who, "bias", bias, finite=True)
    if keep is not None:
        check_number(who, "keep", keep, low=0, integer=True)
    count = num_visual if rank >= num_visual else \
        min(max(math.floor(_decimal(scale) * rank + _decimal(bias)), 0), num_visual)
    return count if keep is None else min(count, keep)


def sparsevlm_recycle_counts(pruned: int, recycle: float = 0.3, clusters: float = 0.1) -> tuple[int, int]:
    """(recycled, cluster count) for `pruned` tokens pruned at a layer: the reference recycles the
    `floor(recycle * P) + 1` best-rated pruned tokens (its tau = 30%) and groups them into
    `floor(clusters * m) + 1` clusters (1/10), each bounded by what there is; nothing when P = 0 or
    `recycle = 0`. Products are exact in the decimal numbers as written (0.3 * 10 is 3).
    """
    who = "sparsevlm_recycle_counts"
    check_number(who, "pruned", pruned, low=0, integer=True)
    check_number(who, "recycle", recycle, low=0, high=1)
    check_number(who, "clusters", clusters, low=0, high=1, low_open=True)
    if pruned == 0 or recycle == 0:
        return 0, 0
    m = min(pruned, math.floor(_decimal(recycle) * pruned) + 1)
    return m, min(m, math.floor(_decimal(clusters) * m) + 1)


def density_peak_clusters(x: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """Density-peak clustering with k nearest neighbours (DPC-KNN), SparseVLM's recycling rule.

    With `d_ij = ||x_i - x_j||_2 / sqrt(C)` over the m tokens x [m, C] and k = `clusters` (the
    reference sizes the neighbourhood by the cluster count; the token itself is its nearest):
    1. density `rho_i = exp(-(1/k) sum_{j in kNN(i)} d_ij^2)`;
    2. `delta_i = min_{j denser than i} d_ij`, the largest distance of all for the densest token;
       "denser" is a higher density, or an equal one at a lower index (the reference adds random
       noise of 1e-6 to break ties; here ties go to the lower index, so the result is deterministic);
    3. centres: the `clusters` tokens with the largest `rho_i * delta_i` (ties: lower index), returned
       ascending;
    4. every token joins its nearest centre (ties: the centre of lower index), each centre itself.
    Returns (centres [c] long, the index of each centre in x; assignment [m] long in [0, c), the
    position in `centres` of each token's cluster). Computed in float32 (float64 stays).
    """
    who = "density_peak_clusters"
    _check_tensor(who, "x", x, (2,), "an [m, C] float tensor")
    m, c_dim = x.shape
    check_number(who, "clusters", clusters, low=1 if m else 0, high=m, integer=True)
    if m == 0:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0, dtype=torch.long)
    w = _wide(x)
    dist = torch.cdist(w.unsqueeze(0), w.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0] / c_dim ** 0.5
    nearest = dist.sort(dim=-1).values[:, :clusters]  # the k smallest distances of each row (itself first)
    density = torch.exp(-(nearest ** 2).mean(dim=-1))
    index = torch.arange(m, device=x.device)
    denser = (density.unsqueeze(0) > density.unsqueeze(1)) | \
        ((density.unsqueeze(0) == density.unsqueeze(1)) & (index.unsqueeze(0) < index.unsqueeze(1)))  # [i, j]
    delta = dist.masked_fill(~denser, float("inf")).amin(dim=-1)
    delta = torch.where(denser.any(dim=-1), delta, dist.max())
    centres = top_k_in_order((delta * density).unsqueeze(0), clusters)[0]  # ascending
    to_centre = dist[:, centres]  # [m, c]
    assignment = to_centre.argmin(dim=-1)  # the first minimum: the centre of lower index
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


def sparsevlm_keep(text_attn: Tensor, text: Tensor, raters: Tensor, image_mask: Tensor, hidden: Tensor, *,
                   scale: float = 13.5, bias: float = 0.0, keep: int | None = None, recycle: float = 0.3,
                   clusters: float = 0.1) -> SparseVLMKeep:
    """One SparseVLM pruning layer (arXiv 2410.04417 v1, Sec. 3.2-3.4), per sample:

    1. `P = (1/H) sum_h text_attn[:, h]` restricted to the raters' rows and the image tokens'
       columns, [R, V] (attention probabilities over the whole sequence, not renormalised);
    2. score of image token v: `s_v = (1/R) sum_r P[r, v]`;
    3. `k = sparsevlm_keep_count(V, rank(P), scale, bias, keep)` (`torch.linalg.matrix_rank`, its
       default tolerance, in float32 as the reference); the k best-scored image tokens stay (ties:
       lower position), the other `V - k` are pruned;
    4. recycling: `(m, c) = sparsevlm_recycle_counts(V - k, recycle, clusters)`; the m best-scored
       pruned tokens are clustered (`density_peak_clusters` on their `hidden` states) and each cluster
       becomes one token, the mean of its members' states, placed at its centre's position (so it
       keeps a position of the prompt's numbering); the other pruned tokens are dropped.
    Every non-image position stays. The kept positions are ascending; samples that keep fewer than
    the most get -1 padding slots on the left (see SparseVLMKeep).

    text_attn:  [B, H, T, N] attention probabilities of the text rows `text` [B, T] (-1: no row).
    raters:     [B, T] bool, the rows that rate (select_raters); padding rows never rate.
    image_mask: [B, N] bool, the image tokens (recycled tokens of an earlier layer are image tokens);
                the number may differ per sample.
    hidden:     [B, N, D] the states recycled tokens are averaged from (the pruning layer's output).
    A sample without raters, or without image tokens, keeps every image token.
    """
    who = "sparsevlm_keep"
    _check_tensor(who, "hidden", hidden, (3,), "a [B, N, D] float tensor")
    b, n, d = hidden.shape
    _check_tensor(who, "text_attn", text_attn, (4,), "a [B, H, T, N] float tensor of attention probabilities")
    if text_attn.shape[0] != b or text_attn.shape[-1] != n:
        _refuse(who, "text_attn", f"a tensor of shape {tuple(text_attn.shape)}", f"({b}, H, T, {n})")
    t = text_attn.shape[2]
    valid = _check_rows(who, text, b, n)
    _check_shape(who, "text", text, (b, t), f"an integer tensor of shape ({b}, {t}) (one per row of text_attn)")
    _check_tensor(who, "raters", raters, (2,), "a [B, T] bool tensor", "bool")
    _check_shape(who, "raters", raters, (b, t), f"a bool tensor of shape ({b}, {t})")
    _check_tensor(who, "image_mask", image_mask, (2,), "a [B, N] bool tensor marking the image tokens", "bool")
    _check_shape(who, "image_mask", image_mask, (b, n), f"a bool tensor of shape ({b}, {n})")
    sparsevlm_keep_count(0, 0, scale, bias, keep)  # checks scale, bias, keep
    sparsevlm_recycle_counts(0, recycle, clusters)  # checks recycle, clusters

    a = _wide(text_attn).mean(dim=1)  # [B, T, N]
    raters = raters & valid
    rows, states, recycled, kept_visual, n_clusters, ranks = [], [], [], [], [], []
    for s in range(b):
        visual = image_mask[s].nonzero()[:, 0]  # ascending
        v = visual.numel()
        matrix = a[s][raters[s]][:, visual]  # [R, V]
        rank = int(torch.linalg.matrix_rank(matrix.float())) if matrix.numel() else 0
        score = matrix.mean(dim=0) if matrix.shape[0] else matrix.new_zeros(v)
        k = sparsevlm_keep_count(v, rank, scale, bias, keep) if matrix.shape[0] else v
        order = stable_argsort(score, descending=True)
        m, c = sparsevlm_recycle_counts(v - k, recycle, clusters)
        chosen = visual[order[:m + k][k:]]  # the m best-scored pruned tokens, best first
        state = hidden[s]
        centres = chosen[:0]
        merged = state.new_zeros(0, d)
        if m:
            centre_at, assignment = density_peak_clusters(state[chosen], c)
            centres = chosen[centre_at]
            sums = torch.zeros(c, d, dtype=_wide(state).dtype, device=state.device).index_add_(
                0, assignment, _wide(state[chosen]))
            sizes = torch.bincount(assignment, minlength=c).unsqueeze(-1)
            merged = (sums / sizes).to(state.dtype)
        stay = ~image_mask[s]
        stay[visual[order[:k]]] = True
        stay[centres] = True
        row = stay.nonzero()[:, 0]
        row_states = state[row]
        is_recycled = torch.isin(row, centres)
        if m:
            slot = torch.searchsorted(row, centres)
            row_states = row_states.index_copy(0, slot, merged)
        rows.append(row)
        states.append(row_states)
        recycled.append(is_recycled)
        kept_visual.append(k)
        n_clusters.append(c)
        ranks.append(rank)

    width = max((r.numel() for r in rows), default=0)
    index = torch.full((b, width), -1, dtype=torch.long, device=hidden.device)
    out = hidden.new_zeros(b, width, d)
    is_recycled = torch.zeros(b, width, dtype=torch.bool, device=hidden.device)
    for s, (row, row_states, rec) in enumerate(zip(rows, states, recycled, strict=True)):
        start = width - row.numel()
        index[s, start:], out[s, start:], is_recycled[s, start:] = row, row_states, rec
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=hidden.device)  # noqa: E731
    return SparseVLMKeep(index, out, is_recycled, as_long(kept_visual), as_long(n_clusters), as_long(ranks))
