"""Scaled dot-product attention with a bias per key (proportional attention's log size), three ways.

Proportional attention adds log(size) of every key to its logits. Handed to
`scaled_dot_product_attention` as an additive float mask, it keeps the attention off the flash
kernel on GPUs (flash takes no mask). Two alternatives give the same result:

- "channel": fold the bias into one extra query/key channel, q' = [q * scale, 1], k' = [k, bias],
  so q' . k' = scale * q . k + bias; the head is padded with zeros to a multiple of 8 channels (a
  size the fused kernels accept) and the attention runs unmasked with scale 1.
- "flex": `torch.nn.attention.flex_attention` with a score modification that adds the bias
  (compiled into one kernel under `torch.compile`; eager it runs PyTorch's reference loop).

"mask" is the plain masked call. "auto" (the default) picks per device: "mask" on the CPU, where
the masked kernel measured fastest (docs/benchmarks.md), "channel" on CUDA, where it keeps flash
attention. A bias that is not per key (a relative position bias, a full mask) always goes as a mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.errors import ConfigError

KERNELS = ("auto", "mask", "channel", "flex")
_kernel = "auto"


@contextmanager
def key_bias_kernel(kind: str) -> Iterator[None]:
    """Run the attention of token-reduced models with `kind` (one of KERNELS) inside the block."""
    global _kernel
    if kind not in KERNELS:
        raise ConfigError(f"key_bias_kernel={kind!r} is invalid; allowed: {', '.join(map(repr, KERNELS))}")
    previous, _kernel = _kernel, kind
    try:
        yield
    finally:
        _kernel = previous


def resolve_kernel(device: torch.device, kind: str | None = None) -> str:
    """The kernel `kind` (default: the current setting) stands for on `device`."""
    kind = _kernel if kind is None else kind
    if kind != "auto":
        return kind
    return "channel" if device.type == "cuda" else "mask"


def is_key_bias(bias: Tensor | None) -> bool:
    """Whether `bias` is one value per key, [B or 1, 1, 1, N], broadcast over heads and queries."""
    return bias is not None and bias.dim() == 4 and bias.shape[1] == 1 and bias.shape[2] == 1


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0,
              kind: str | None = None) -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + bias) v for q, k, v [B, H, N, head_dim], with a per-key
    bias through the chosen kernel (`kind`, default the current `key_bias_kernel` setting)."""
    chosen = resolve_kernel(q.device, kind) if is_key_bias(bias) else "mask"
    if chosen == "flex" and dropout_p:
        chosen = "mask"  # flex_attention has no dropout
    if chosen == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    if chosen == "channel":
        return _channel_attention(q, k, v, bias, dropout_p)
    return _flex_attention(q, k, v, bias)


def _channel_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float) -> Tensor:
    b, h, n, d = q.shape
    pad = -(d + 1) % 8
    key_bias = bias[:, :, 0, :, None].to(k.dtype).expand(b, h, k.shape[2], 1)
    qx = F.pad(torch.cat([q * d**-0.5, q.new_ones(b, h, n, 1)], dim=-1), (0, pad))
    kx = F.pad(torch.cat([k, key_bias], dim=-1), (0, pad))
    vx = F.pad(v, (0, pad + 1))
    return F.scaled_dot_product_attention(qx, kx, vx, dropout_p=dropout_p, scale=1.0)[..., :d]


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    key_bias = bias[:, 0, 0, :].to(q.dtype).expand(q.shape[0], -1)

    def add_key_bias(score, batch, head, q_idx, kv_idx):
        return score + key_bias[batch, kv_idx]

    return flex_attention(q, k, v, score_mod=add_key_bias)
