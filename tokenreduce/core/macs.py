"""Analytic multiply-accumulates (MACs) of a ViT from its realised token counts.

What is counted: every matrix product (linear layers, the patch-embedding convolution, q.k^T and
attention.v, the reducer's own similarity matrices). What is not: norms, activations, softmax,
additions and the merge itself, which are elementwise. This is what the literature reports as
"GFLOPs" for ViTs, and what `torch.utils.flop_counter.FlopCounterMode` counts (as 2 FLOPs per MAC).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tokenreduce.core.state import LayerRecord


def counted_macs(call: Callable[[], object]) -> int:
    """MACs of `call()` as FlopCounterMode counts them (2 FLOPs per MAC), without gradients and with
    attention through the math kernel, which it decomposes into the matrix products it counts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops() // 2


def linear_macs(module: nn.Module) -> int:
    """MACs per token of all linear layers inside `module` (each applied once per token)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class BlockCost:
    attn_linear: int  # MACs per token of the attention's projections (qkv, proj, gate)
    attn_dim: int  # heads * head_dim: q.k^T and attention.v each cost N * N * attn_dim
    mlp_linear: int  # MACs per token of the MLP
    qk_linear: int = 0  # MACs per token of the query and key projections alone (part of attn_linear)

    def macs(self, tokens_attn: int, tokens_mlp: int) -> int:
        return tokens_attn * self.attn_linear + 2 * tokens_attn * tokens_attn * self.attn_dim + tokens_mlp * self.mlp_linear

    def probe_macs(self, tokens: int) -> int:
        """q/k projections and q.k^T of `tokens` tokens: the attention probabilities alone."""
        return tokens * self.qk_linear + tokens * tokens * self.attn_dim

    def layer_macs(self, record: LayerRecord) -> int:
        """MACs of one block as its record says it ran (a probe before reducing, a reused map)."""
        macs = self.macs(record.tokens_attn, record.tokens_mlp) + self.probe_macs(record.probe_tokens)
        if record.probe_reused:
            macs -= self.probe_macs(record.tokens_attn)
        return macs


def macs_parts(embed: int, costs: list[BlockCost], records: list[LayerRecord], head: int) -> dict[str, int]:
    """MACs of one image by where they are spent: the embedding, the blocks the pass ran (the first
    `len(records)` of `costs`), the reducer's own work, the head; and their total."""
    blocks = sum(c.layer_macs(r) for c, r in zip(costs[: len(records)], records, strict=True))
    reducer = sum(r.reducer_macs for r in records)
    return {"embed": embed, "blocks": blocks, "reducer": reducer, "head": head,
            "total": embed + blocks + reducer + head}
