"""The state of one forward pass: token sizes, the source map and what each layer did.

A new `ReductionState` is made at the start of every forward pass and handed to each block, so a
model can run re-entrantly and nothing leaks from one pass into the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokenreduce.core.merge import Assignment, carry_positions, combine, update_source


@dataclass
class LayerRecord:
    """Tokens (prefix included) through one block's attention and MLP, and the reducer's own MACs.

    A block that reduces its own input may first run a probe: q/k projections and q.k^T on the
    `probe_tokens` tokens it received, to get the attention probabilities that guide the
    reduction (MCTF). With `probe_reused` the attention then reused the probe's (merged)
    probabilities on its `tokens_attn` tokens, so it computed no q/k and no q.k^T of its own.
    """

    tokens_attn: int
    tokens_mlp: int = -1
    tokens_in: int = -1  # entering the block, before any reduction of its input
    reducer_macs: int = 0
    probe_tokens: int = 0
    probe_reused: bool = False


@dataclass
class ReductionState:
    num_prefix: int
    removals: list[int]
    prop_attn: bool = True
    sizes: Tensor | None = None  # [B, N, 1] float32; None while every token is one patch
    source: Tensor | None = None  # [B, N_in] long: current token of every input token (N = dropped)
    records: list[LayerRecord] = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # per-pass data a reducer wants to keep (losses, masks)
    final_tokens: int = 0  # tokens leaving the last block
    # [B, N, D] float32 coordinates of every token, for models whose attention reads positions
    # (RoPE); set by the adapter, carried through every merge by `position_rule` (see carry_positions)
    positions: Tensor | None = None
    position_rule: str = "destination"
    start_positions: Tensor | None = field(default=None, repr=False)
    # a padded batch run in groups of images with the same number of real patches (timm_naflex):
    # (image indices, the group's state); the fields above then describe the whole batch, with
    # padding of size 0, and the records those of the image that sets the batch's width
    groups: list[tuple[Tensor, ReductionState]] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, x: Tensor, num_prefix: int, removals: list[int], prop_attn: bool, trace_source: bool):
        state = cls(num_prefix=num_prefix, removals=removals, prop_attn=prop_attn)
        if trace_source:
            state.source = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1).clone()
        return state

    @classmethod
    def gather(cls, groups: list[tuple[Tensor, Tensor, ReductionState]], batch: int, tokens_in: int, width: int):
        """The state of a batch whose groups (image indices, output tokens, state) were run apart and
        put back into `width` tokens, each image's first and padding after."""
        widest = max(groups, key=lambda g: g[1].shape[1])[2]
        device = groups[0][1].device
        state = cls(num_prefix=widest.num_prefix, removals=widest.removals, prop_attn=widest.prop_attn,
                    records=widest.records, final_tokens=width, groups=[(index, s) for index, _, s in groups])
        state.sizes = torch.zeros(batch, width, 1, device=device)
        traced = all(s.source is not None for _, _, s in groups)
        state.source = torch.full((batch, tokens_in), width, device=device) if traced else None
        for index, y, group in groups:
            state.sizes[index, : y.shape[1]] = 1.0 if group.sizes is None else group.sizes
            if traced:  # a group's dropped tokens, and the padding it never saw, are dropped here
                src = group.source.masked_fill(group.source == group.final_tokens, width)
                state.source[index, : src.shape[1]] = src
        return state

    def real_tokens(self, x: Tensor) -> Tensor:
        """[B, N] bool: which of the tokens `x` this pass left are real (not padding)."""
        if self.sizes is None or self.sizes.shape[:2] != x.shape[:2]:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self.sizes[..., 0] > 0

    def place(self, coords: Tensor, batch: int, rule: str) -> None:
        """Give every patch its coordinates `coords` [N, D] and every prefix token zeros, for all
        samples; merges then carry them by `rule` (see carry_positions)."""
        prefix = coords.new_zeros(self.num_prefix, coords.shape[1])
        self.positions = self.start_positions = torch.cat([prefix, coords]).float().expand(batch, -1, -1)
        self.position_rule = rule

    @property
    def positions_moved(self) -> bool:
        """Whether the tokens changed since `place` (before that, a model may use its own grid tables)."""
        return self.positions is not self.start_positions

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """Proportional attention: log(size) added to every key's logit, shaped [B, 1, 1, N]."""
        if not self.prop_attn or self.sizes is None:
            return None
        return self.sizes.log().to(dtype).transpose(1, 2).unsqueeze(1)

    def begin_layer(self, num_tokens: int) -> LayerRecord:
        self.records.append(LayerRecord(tokens_attn=num_tokens, tokens_in=num_tokens))
        return self.records[-1]

    def end_layer(self, num_tokens: int) -> None:
        if self.records[-1].tokens_mlp < 0:
            self.records[-1].tokens_mlp = num_tokens

    def add_macs(self, macs: int) -> None:
        self.records[-1].reducer_macs += macs

    def merge(self, x: Tensor, assignment: Assignment | None, mode: str = "wavg", **kwargs) -> Tensor:
        """Apply one assignment to the tokens, their sizes and the source map."""
        if assignment is None:
            return x
        if self.positions is not None:
            self.positions = carry_positions(self.positions, self.sizes, assignment, self.position_rule)
        x, self.sizes = combine(x, self.sizes, assignment, mode=mode, **kwargs)
        if self.source is not None:
            self.source = update_source(self.source, assignment)
        return x

    def tokens_per_layer(self) -> list[int]:
        """Tokens (prefix included) through each block's attention, then leaving the last one."""
        if not self.records:
            return []
        return [rec.tokens_attn for rec in self.records] + [self.final_tokens]
