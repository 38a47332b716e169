"""Combining tokens: one assignment of tokens to output slots, applied to features, sizes and sources.

A reducer decides *where* every token goes (an `Assignment`); the functions here decide *how* the
tokens that share a slot become one. Merging, pruning and fusing all go through `combine`, so the
weighted merge exists once; `unmerge` takes the same assignment back, giving every token its slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.errors import ConfigError

MERGE_MODES = ("wavg", "mean", "mlerp", "prune", "max")


@dataclass(frozen=True)
class Assignment:
    """Where each of the N tokens of one layer goes.

    dest:   [B, N] long, the output slot of every token, in [0, n_out]; ``n_out`` means dropped.
    n_out:  number of output tokens.
    merged: [B, N] bool, True for a token absorbed into a slot that another token represents (the
            source of a merge); None when no token is a source.
    represented: every slot holds exactly one token that is not `merged`, and no token is dropped
            (true of bipartite matchings); lets `combine_attention` copy instead of scatter.
    """

    dest: Tensor
    n_out: int
    merged: Tensor | None = None
    represented: bool = False


class Matching:
    """A matching in the form that is cheapest to apply: which token represents each output slot,
    and which tokens merge into which slots (every token is one or the other; none is dropped).

    reps:    [B, n_out] long, the token kept as each slot, in output order.
    sources: [B, k] long, the tokens merged into other slots; slots: [B, k] their slots.

    It is an `Assignment` for everything that reads one (`dest` and `merged` are built on first
    use, e.g. to trace sources or carry positions); `combine` merges from it directly, with one
    gather and one scatter over the slots and sources instead of a scatter over every token.
    """

    represented = True

    def __init__(self, reps: Tensor, sources: Tensor, slots: Tensor, num_tokens: int):
        self.reps, self.sources, self.slots = reps, sources, slots
        self.n_out, self.num_tokens = reps.shape[1], num_tokens
        self._dest = self._merged = None

    # built on first use and kept (not functools.cached_property: its lock stops torch.compile)
    @property
    def dest(self) -> Tensor:
        if self._dest is None:
            out = torch.empty(self.reps.shape[0], self.num_tokens, dtype=torch.long, device=self.reps.device)
            out.scatter_(1, self.reps, torch.arange(self.n_out, device=self.reps.device).expand_as(self.reps))
            self._dest = out.scatter_(1, self.sources, self.slots)
        return self._dest

    @property
    def merged(self) -> Tensor:
        if self._merged is None:
            out = torch.zeros(self.reps.shape[0], self.num_tokens, dtype=torch.bool, device=self.reps.device)
            self._merged = out.scatter_(1, self.sources, True)
        return self._merged


def _combine_matching(x: Tensor, sizes: Tensor | None, matching: Matching, mode: str,
                      mlerp_eps: float) -> tuple[Tensor, Tensor]:
    """The size-weighted merge ("wavg", or "mlerp") of `combine` from a `Matching`.

    Each slot's row is copied whole from its representative, then only the slots that receive
    sources change: with S the slot's new size, its mean is x_rep + sum_i (s_i / S) (x_i - x_rep)
    over its sources i. So the work beyond one row copy per slot is on the few merged rows (row
    copies, where a gather with an index per element is several times slower)."""
    b, n, c = x.shape
    reps, sources, slots = matching.reps, matching.sources, matching.slots
    # rows of the flattened batch: each sample's tokens after the previous sample's (skipped at
    # batch 1 in eager; a symbolic batch, under export, is not branched on)
    if isinstance(b, torch.SymInt) or b > 1:
        first = torch.arange(b, device=x.device).unsqueeze(1)
        reps, sources, slots = reps + first * n, sources + first * n, slots + first * matching.n_out
    any_sources = matching.sources.shape[1] > 0  # per image, so it does not depend on the batch
    reps, sources, slots = reps.flatten(), sources.flatten(), slots.flatten()
    rows = x.reshape(b * n, c)
    size_rows = torch.ones(b * n, 1, device=x.device) if sizes is None else sizes.reshape(b * n, 1)
    out = rows.index_select(0, reps).float()
    new_sizes = size_rows.index_select(0, reps)
    if any_sources:
        source_sizes = size_rows.index_select(0, sources)
        new_sizes.index_add_(0, slots, source_sizes)
        pull = rows.index_select(0, sources).float() - out.index_select(0, slots)
        out.index_add_(0, slots, pull * (source_sizes / new_sizes.index_select(0, slots)))
    if mode == "mlerp":  # rescaled to the largest member norm, taken over the same rows
        norms = rows.float().norm(dim=-1, keepdim=True)
        largest = norms.index_select(0, reps)
        if any_sources:
            largest.scatter_reduce_(0, slots.unsqueeze(1), norms.index_select(0, sources), "amax")
        out = out / out.norm(dim=-1, keepdim=True).clamp_min(mlerp_eps) * largest
    return out.view(b, matching.n_out, c).to(x.dtype), new_sizes.view(b, matching.n_out, 1)


def scatter_sum(values: Tensor, dest: Tensor, n_out: int) -> Tensor:
    """Sum `values` [B, N, C] into `n_out` slots by `dest` [B, N]; slot `n_out` (dropped) is discarded."""
    b, _, c = values.shape
    out = values.new_zeros(b, n_out + 1, c)
    out.scatter_add_(1, dest.unsqueeze(-1).expand(-1, -1, c), values)
    return out[:, :n_out]


def scatter_amax(values: Tensor, dest: Tensor, n_out: int) -> Tensor:
    b, _, c = values.shape
    out = values.new_full((b, n_out + 1, c), float("-inf"))
    out = out.scatter_reduce(1, dest.unsqueeze(-1).expand(-1, -1, c), values, reduce="amax", include_self=True)
    return out[:, :n_out]


def stable_argsort(values: Tensor, descending: bool = False) -> Tensor:
    """`values.argsort(dim=-1, descending=descending, stable=True)`: equal values keep their order.

    While a model is exported (`torch.export`, and so the ONNX exporter) the same order is computed
    without a sort: each value's place is the number of values that go before it (larger, or
    smaller, then equal ones at lower indices), NaN ranked above everything as torch's sort does.
    ONNX has no stable sort, and PyTorch's ONNX exporters refuse `aten.sort.stable`; the counting
    costs N^2 comparisons per row (a 100-token row: 10^4), so eager keeps the sort.
    """
    if not torch.compiler.is_exporting():
        return values.argsort(dim=-1, descending=descending, stable=True)
    return argsort_by_counting(values, descending)


def argsort_by_counting(values: Tensor, descending: bool = False) -> Tensor:
    """The order of `stable_argsort`, from comparisons, a sum and a scatter (no sort: exportable anywhere)."""
    v, w = values.unsqueeze(-1), values.unsqueeze(-2)  # [..., i, j]: does value j go before value i?
    if values.is_floating_point():
        nan_v, nan_w = v.isnan(), w.isnan()
        first = (w > v) | (nan_w & ~nan_v) if descending else (w < v) | (nan_v & ~nan_w)
        equal = (w == v) | (nan_v & nan_w)
    else:
        first, equal = (w > v) if descending else (w < v), w == v
    index = torch.arange(values.shape[-1], device=values.device)
    place = (first | (equal & (index < index.unsqueeze(-1)))).sum(dim=-1)
    return torch.empty_like(place).scatter_(-1, place, index.expand_as(place))


def _weights(sizes: Tensor | None, like: Tensor) -> Tensor:
    if sizes is None:
        return like.new_ones(like.shape[0], like.shape[1], 1, dtype=torch.float32)
    return sizes


def _merge_weights(sizes: Tensor | None, like: Tensor, mode: str, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """(size weights, averaging weights) of every token, [B, N, 1] float32, for `mode`."""
    w_size = _weights(sizes, like)
    w = w_size if mode != "mean" else torch.ones_like(w_size)
    if weights is not None:
        w = w * weights.float()
    return w_size, w


def combine(
    x: Tensor,
    sizes: Tensor | None,
    assignment: Assignment,
    mode: str = "wavg",
    weights: Tensor | None = None,
    prune_adds_size: bool = True,
    mlerp_eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Merge the tokens of `x` [B, N, C] that share a slot; return the new tokens and sizes.

    sizes:   [B, N, 1] float32 patches per token, or None when every token is one patch.
    mode:    "wavg"  size-weighted mean (ToMe); "mean" plain mean;
             "mlerp" direction of the size-weighted mean scaled to the largest member norm (ToFu):
                     `avg / max(||avg||, mlerp_eps) * max_i ||x_i||`, dividing by the merged vector's
                     own norm, so the result's norm is the largest member's;
             "prune" the slot keeps its representative's features unchanged, sources are dropped;
             "max"   elementwise maximum over the members (MCTF's max pooling).
    weights: [B, N, 1] extra per-token weights multiplied into the size weights (e.g. attention).
    prune_adds_size: in "prune" mode, whether a dropped source's size is added to its slot.
    mlerp_eps: in "mlerp" mode, the smallest norm divided by (a merged mean of opposite tokens can be 0).
    """
    if mode not in MERGE_MODES:
        raise ConfigError(f"merge mode={mode!r} is invalid; allowed: {', '.join(MERGE_MODES)}")
    if isinstance(assignment, Matching) and mode in ("wavg", "mlerp") and weights is None:
        return _combine_matching(x, sizes, assignment, mode, mlerp_eps)
    dest, n_out = assignment.dest, assignment.n_out
    w_size, w = _merge_weights(sizes, x, mode, weights)
    new_sizes = scatter_sum(w_size, dest, n_out)
    if mode == "prune":
        keep = dest if assignment.merged is None else dest.masked_fill(assignment.merged, n_out)
        out = scatter_sum(x, keep, n_out)
        if not prune_adds_size:
            new_sizes = scatter_sum(w_size, keep, n_out)
        return out, new_sizes
    if mode == "max":
        return scatter_amax(x, dest, n_out), new_sizes
    w_total = new_sizes if w is w_size else scatter_sum(w, dest, n_out)
    total = scatter_sum(x.float() * w, dest, n_out) / w_total
    if mode == "mlerp":
        norms = x.float().norm(dim=-1, keepdim=True)
        max_norm = scatter_amax(norms, dest, n_out)
        total = total / total.norm(dim=-1, keepdim=True).clamp_min(mlerp_eps) * max_norm
    return total.to(x.dtype), new_sizes


def unmerge(y: Tensor, assignment: Assignment, fill: Tensor | None = None) -> Tensor:
    """The tokens [B, N, C] before `assignment`, from its slots `y` [B, n_out, C]: each token takes
    its slot's row, in the input's order.

    So a merged source gets its destination's (merged, perhaps since processed) value, a token
    that kept a slot of its own (prefix tokens included) gets its own, and `unmerge(combine(x))`
    is `x` wherever the members of a slot were equal (in MLERP up to rounding). A merged output
    stands for each of its members whole (not a share by size), so sizes are not split back: the
    sizes, positions and source map of the unmerged tokens are the ones that entered the merge,
    which the caller keeps (the merged sizes gathered back would count a slot's patches once per
    member).
    fill: [B, N, C] values for tokens the assignment dropped (slot n_out), e.g. the block's input
          so they pass it unchanged; without it a dropped token is refused, as there is no output
          to give it.
    """
    dest, n_out = assignment.dest, assignment.n_out
    b, n = dest.shape
    if y.dim() != 3 or y.shape[:2] != (b, n_out):
        raise ConfigError(f"unmerge: tokens of shape {tuple(y.shape)} is invalid; allowed: "
                          f"({b}, {n_out}, C), one per slot of the assignment (batch {b}, "
                          f"{n_out} slots from {n} tokens)")
    c = y.shape[2]
    if fill is not None and fill.shape != (b, n, c):
        raise ConfigError(f"unmerge: fill of shape {tuple(fill.shape)} is invalid; allowed: ({b}, {n}, {c}), "
                          "one per token before the merge")
    width = n_out
    if not assignment.represented:  # a zero row per image for the dropped tokens' index n_out
        y, width = torch.cat([y, y.new_zeros(b, 1, c)], dim=1), n_out + 1
    # one row gather over the flattened batch: each image's slots after the previous image's
    rows = (dest + torch.arange(b, device=dest.device).unsqueeze(1) * width).flatten()
    out = y.reshape(b * width, c).index_select(0, rows).view(b, n, c)
    if assignment.represented:  # no token is dropped: nothing to check (and no host sync)
        return out
    dropped = (dest == n_out).unsqueeze(-1)
    if fill is not None:
        return torch.where(dropped, fill.to(out.dtype), out)
    if bool(dropped.any()):
        raise ConfigError(f"unmerge: the assignment drops {int(dropped.sum())} of {b * n} tokens, which "
                          "have no slot to take; allowed: an assignment that drops none, or fill= values")
    return out


def combine_attention(
    attn: Tensor,
    sizes: Tensor | None,
    assignment: Assignment,
    mode: str = "wavg",
    weights: Tensor | None = None,
) -> Tensor:
    """Merge attention probabilities [B, H, N, N] with the assignment that merges their tokens.

    The key columns of a slot are summed (the merged key stands for all its members, which is what
    proportional attention gives it), and the query rows are pooled like the tokens in `combine`
    with the same `sizes`, `mode` and `weights`, so every row of a row-stochastic map still sums
    to 1 ("max" takes the elementwise maximum of the rows instead). Columns of dropped tokens are
    discarded. Result: [B, H, n_out, n_out].
    """
    if mode not in ("wavg", "mean", "max"):
        raise ConfigError(f"attention merge mode={mode!r} is invalid; allowed: 'wavg', 'mean', 'max'")
    b, h, n, _ = attn.shape
    dest, n_out = assignment.dest, assignment.n_out
    cols = _sum_columns(attn, assignment)
    if mode == "max":
        rows = cols.new_full((b, h, n_out + 1, n_out), float("-inf"))
        row_index = dest[:, None, :, None].expand(b, h, n, n_out)
        return rows.scatter_reduce(2, row_index, cols, reduce="amax", include_self=True)[:, :, :n_out]
    _, w = _merge_weights(sizes, attn[:, 0], mode, weights)
    share = (w / scatter_sum(w, dest, n_out + 1).gather(1, dest.unsqueeze(-1)))[..., 0]  # each row's weight in its slot
    # rows are contiguous: one index_add over (batch, head, row) moves whole rows at once; a spare
    # row per head catches dropped tokens (slot n_out) unless there can be none
    slots = n_out if assignment.represented else n_out + 1
    heads = torch.arange(b * h, device=attn.device).view(b, h, 1) * slots
    rows = cols.new_zeros(b * h * slots, n_out)
    rows.index_add_(0, (heads + dest.unsqueeze(1)).reshape(-1), (cols * share.to(cols.dtype)[:, None, :, None]).reshape(-1, n_out))
    return rows.view(b, h, slots, n_out)[:, :, :n_out]


def _sum_columns(attn: Tensor, assignment: Assignment) -> Tensor:
    """[B, H, N, n_out]: the key columns of `attn` summed per slot (dropped tokens left out)."""
    b, h, n, _ = attn.shape
    dest, n_out, merged = assignment.dest, assignment.n_out, assignment.merged
    if assignment.represented and merged is not None:
        # copy each slot's representative column, then add the few merged ones (no host sync)
        token = torch.arange(n, device=dest.device).expand(b, n)
        reps = torch.zeros_like(dest[:, : n_out + 1]).scatter_(1, dest.masked_fill(merged, n_out), token)[:, :n_out]
        sources = stable_argsort(merged.byte(), descending=True)[:, : n - n_out]
        cols = attn.gather(3, reps[:, None, None, :].expand(b, h, n, n_out))
        source_cols = attn.gather(3, sources[:, None, None, :].expand(b, h, n, n - n_out))
        slots = dest.gather(1, sources)[:, None, None, :].expand(b, h, n, n - n_out)
        return cols.scatter_add_(3, slots, source_cols)
    cols = attn.new_zeros(b, h, n, n_out + 1)
    cols.scatter_add_(3, dest[:, None, None, :].expand(b, h, n, n), attn)
    return cols[..., :n_out]


POSITION_RULES = ("destination", "mean")


def carry_positions(positions: Tensor, sizes: Tensor | None, assignment: Assignment, rule: str) -> Tensor:
    """The positions [B, n_out, D] of the tokens after `assignment`, from theirs [B, N, D] (float32).

    rule "destination": a slot keeps the position of the token that represents it (the merge's
        destination, a kept token); a slot that no token represents (EViT's fused token, made only
        of sources) takes the size-weighted mean of its members.
    rule "mean": every slot takes the size-weighted mean of its members' positions.
    Dropped tokens are left out either way.
    """
    if rule not in POSITION_RULES:
        raise ConfigError(f"position rule={rule!r} is invalid; allowed: {', '.join(map(repr, POSITION_RULES))}")
    dest, n_out = assignment.dest, assignment.n_out
    w = _weights(sizes, positions)
    mean = scatter_sum(positions * w, dest, n_out) / scatter_sum(w, dest, n_out).clamp_min(1e-12)
    held_by = dest if rule == "mean" or assignment.merged is None else dest.masked_fill(assignment.merged, n_out)
    # a slot held by exactly one token copies its position (exact, where p * w / w may round)
    count = scatter_sum(torch.ones_like(w), held_by, n_out)
    return torch.where(count == 1, scatter_sum(positions, held_by, n_out), mean)


def keep_assignment(keep: Tensor, fuse: bool = False, n_keep: int | None = None) -> Assignment:
    """The assignment of a pruning step: `keep` [B, N] bool, the same number of True per row.

    Kept tokens take the first slots in their original order; the others are dropped, or with
    `fuse` all go to one extra last slot (EViT's fused token). `n_keep`, the True per row, is
    counted when not given (give it where it is known: counting reads the tensor, which
    torch.compile cannot trace).
    """
    if n_keep is None:
        n_keep = int(keep[0].sum()) if keep.shape[0] else 0
    fuse = fuse and n_keep < keep.shape[1]  # an empty fused slot would have size 0
    slot = keep.long().cumsum(dim=1) - 1
    dest = torch.where(keep, slot, torch.full_like(slot, n_keep))
    return Assignment(dest=dest, n_out=n_keep + int(fuse), merged=~keep if fuse else None)


def update_source(source: Tensor, assignment: Assignment) -> Tensor:
    """Follow each input token [B, N_in] (value = its current token, N = dropped) to its new slot."""
    dest = assignment.dest
    dropped = dest.new_full((dest.shape[0], 1), assignment.n_out)
    return torch.cat([dest, dropped], dim=1).gather(1, source)


def source_matrix(source: Tensor, num_tokens: int) -> Tensor:
    """[B, num_tokens, N_in] 0/1 matrix: entry (t, i) is 1 when input token i ended in token t."""
    onehot = torch.zeros(source.shape[0], num_tokens + 1, source.shape[1], device=source.device)
    onehot.scatter_(1, source.unsqueeze(1), 1.0)
    return onehot[:, :num_tokens]
