"""core.macs.counted_macs: the MACs FlopCounterMode counts, attention included, against a hand count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenreduce.core.macs import counted_macs, linear_macs


def test_counted_macs_are_a_linear_layer_and_attention_by_hand():
    """A linear layer on 10 tokens (10 * 8 * 6) and attention of 2 heads over 10 tokens of width 4
    (q.k^T and attention.v: 2 * 2 * 10 * 10 * 4); sdpa is counted through the math kernel, and the
    count runs without gradients."""
    layer = torch.nn.Linear(8, 6)
    x, q = torch.randn(10, 8), torch.randn(1, 2, 10, 4)
    seen = {}

    def call():
        seen["grad"] = torch.is_grad_enabled()
        layer(x)
        F.scaled_dot_product_attention(q, q, q)

    assert counted_macs(call) == 10 * linear_macs(layer) + 2 * 2 * 10 * 10 * 4
    assert seen["grad"] is False
