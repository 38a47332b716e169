"""Agglomerative clustering of tokens (ATC), batched over images, returning an `Assignment`.

Bottom-up: every non-prefix token starts as its own cluster; the two clusters at the smallest
cosine distance (1 - cosine similarity of the metric) join, the distances of the joined cluster to
the others follow the linkage (Lance-Williams updates), and this repeats until `r` joins are done.

The joins are sequential by nature. What is batched: each join is one step for every image of the
batch at once (an argmin over each image's distance matrix, then row and column updates), so a
layer costs `r` steps of a few operations on [B, M, M] tensors, M the non-prefix tokens, plus one
[B, M, M] similarity product; memory is one [B, M, M] float32 distance matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.merge import Assignment
from tokenreduce.errors import ConfigError

LINKAGES = ("single", "complete", "average")


def leave_one(tokens: int) -> int:
    """Clustering can join all but one cluster in a layer."""
    return max(tokens - 1, 0)


@torch.no_grad()
def agglomerative_clustering(metric: Tensor, r: int, num_prefix: int, linkage: str = "average") -> Assignment | None:
    """Join the non-prefix tokens into `M - r` clusters by `linkage` on the cosine distance of `metric`.

    metric: [B, N, d]. Cluster distances: "single" the closest pair of members, "complete" the
    farthest, "average" the mean over all member pairs. Ties join the pair (i, j), i < j, with the
    smallest i, then the smallest j. A cluster's slot follows its first member: output order is
    prefix tokens, then clusters by their first token's position. Returns None when r <= 0.
    """
    if linkage not in LINKAGES:
        raise ConfigError(f"linkage={linkage!r} is invalid; allowed: {', '.join(map(repr, LINKAGES))}")
    batch, n, _ = metric.shape
    m = n - num_prefix
    r = min(r, m - 1)
    if r <= 0:
        return None
    unit = F.normalize(metric[:, num_prefix:].float(), dim=-1)
    dist = 1.0 - unit @ unit.transpose(-1, -2)
    eye = torch.eye(m, dtype=torch.bool, device=metric.device)
    dist = dist.masked_fill(eye, float("inf"))
    first = torch.arange(m, device=metric.device).expand(batch, m)
    label = first.clone()  # every token's cluster, named by the cluster's first token
    count = torch.ones(batch, m, device=metric.device)
    images = torch.arange(batch, device=metric.device)
    for _ in range(r):
        pair = dist.view(batch, -1).argmin(dim=1)
        i, j = pair // m, pair % m
        keep, gone = torch.minimum(i, j), torch.maximum(i, j)
        d_keep, d_gone = dist[images, keep], dist[images, gone]
        if linkage == "single":
            joined = torch.minimum(d_keep, d_gone)
        elif linkage == "complete":
            joined = torch.maximum(d_keep, d_gone)
        else:
            n_keep, n_gone = count[images, keep].unsqueeze(1), count[images, gone].unsqueeze(1)
            joined = (n_keep * d_keep + n_gone * d_gone) / (n_keep + n_gone)
        joined[images, keep] = float("inf")
        joined[images, gone] = float("inf")
        dist[images, keep] = joined
        dist[images, :, keep] = joined
        dist[images, gone] = float("inf")
        dist[images, :, gone] = float("inf")
        count[images, keep] += count[images, gone]
        count[images, gone] = 0
        label = torch.where(label == gone.unsqueeze(1), keep.unsqueeze(1), label)
    slot = (count > 0).long().cumsum(dim=1) - 1  # clusters in order of their first token
    dest = torch.cat([torch.arange(num_prefix, device=metric.device).expand(batch, -1),
                      num_prefix + slot.gather(1, label)], dim=1)
    merged = torch.cat([torch.zeros(batch, num_prefix, dtype=torch.bool, device=metric.device), label != first], dim=1)
    return Assignment(dest=dest, n_out=n - r, merged=merged, represented=True)


def clustering_macs(num_prefix: int, num_tokens: int, dim: int) -> int:
    """Multiply-accumulates of the token similarity matrix for one image."""
    m = num_tokens - num_prefix
    return m * m * dim
