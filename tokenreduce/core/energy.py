"""PiToMe's energy score: how crowded each token's neighbourhood is in cosine similarity.

A token with many similar tokens (high energy) sits in a large cluster and is safe to merge; a
token unlike the others (low energy) carries information of its own and should be kept.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tokenreduce.errors import ConfigError

KERNELS = ("elu", "gaussian")


def layer_margin(margin: float, layer: int, num_layers: int) -> float:
    """The margin shrinks linearly with depth: `m_l = m0 * (1 - l / L)`."""
    return margin * (1.0 - layer / num_layers)


def energy_score(metric: Tensor, margin: float, alpha: float = 1.0, kernel: str = "elu",
                 normalized: bool = False) -> Tensor:
    """Energy of every token of `metric` [B, T, d] (prefix tokens already removed): [B, T] float32.

    The metric is L2-normalised here (unless `normalized` says its rows already have unit norm), so
    `S = k k^T` holds cosine similarities (1 on the diagonal: every token counts itself). Then
    `E_i = mean_j f(S_ij)` with
      - "elu" (vision):     f(s) = s - m            if s > m, else alpha * (exp(s - m) - 1);
      - "gaussian" (text):  f(s) = exp(-0.5 * ((1 - s) / sigma)^2), sigma = 1 - m. The reference text
        code also multiplies by the Gaussian's normalising constant, which changes no ordering and is
        left out.
    """
    if kernel not in KERNELS:
        raise ConfigError(f"energy kernel={kernel!r} is invalid; allowed: {', '.join(KERNELS)}")
    if kernel == "gaussian" and not margin < 1:
        raise ConfigError(f"energy margin={margin!r} is invalid for the gaussian kernel; allowed: below 1")
    k = metric if normalized else F.normalize(metric.float(), dim=-1)
    sim = k @ k.transpose(-1, -2)
    if kernel == "elu":
        # ELU(z) = max(z, 0) + alpha * (exp(min(z, 0)) - 1), averaged term by term: the same value as
        # F.elu(...).mean(), at half the cost on CPUs, where F.elu is not vectorised
        z = sim - margin
        return z.clamp(min=0).mean(dim=-1).add_(z.clamp(max=0).exp_().mean(dim=-1), alpha=alpha).sub_(alpha)
    sigma = 1.0 - margin
    return ((1.0 - sim) / sigma).square().mul(-0.5).exp().mean(dim=-1)


def energy_macs(num_tokens: int, dim: int) -> int:
    """Multiply-accumulates of the T x T similarity matrix behind the energy, one image."""
    return num_tokens * num_tokens * dim
