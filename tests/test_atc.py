"""ATC: agglomerative clustering against a plain loop from the linkage definitions, and the reducer."""

import itertools

import pytest
import torch
from conftest import images_for, make_model

import tokenreduce
from tokenreduce.core.clustering import LINKAGES, agglomerative_clustering
from tokenreduce.errors import ConfigError


def reference_clusters(metric: torch.Tensor, r: int, linkage: str) -> list[list[int]]:
    """Join clusters one pair at a time, each cluster distance computed afresh from the token
    distances by the linkage's definition (closest pair, farthest pair, mean over all pairs); the
    closest clusters join, ties to the smallest first member, then the smallest second."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    dist = (1 - unit @ unit.T).tolist()
    clusters = [[i] for i in range(len(dist))]
    combine = {"single": min, "complete": max, "average": lambda ds: sum(ds) / len(ds)}[linkage]
    for _ in range(r):
        best = None
        for (a, ca), (b, cb) in itertools.combinations(enumerate(clusters), 2):
            d = combine([dist[i][j] for i in ca for j in cb])
            if best is None or d < best[0]:
                best = (d, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("seed", range(3))
def test_clusters_follow_the_linkage_definitions(linkage, seed):
    g = torch.Generator().manual_seed(seed)
    batch, prefix, tokens, r = 3, 1, 14, 9
    metric = torch.randn(batch, prefix + tokens, 5, generator=g, dtype=torch.float64)
    assignment = agglomerative_clustering(metric, r, prefix, linkage)
    assert assignment.n_out == prefix + tokens - r and assignment.represented
    for b in range(batch):
        want = reference_clusters(metric[b, prefix:], r, linkage)
        dest = assignment.dest[b].tolist()
        assert dest[:prefix] == list(range(prefix))
        got = [[i - prefix for i in range(prefix, prefix + tokens) if dest[i] == s] for s in range(prefix, assignment.n_out)]
        assert got == want  # slots in the order of their first token
        firsts = {c[0] + prefix for c in got}
        assert [not m for m in assignment.merged[b, prefix:].tolist()] == [i + prefix in firsts for i in range(tokens)]


def test_linkages_differ_and_a_bad_one_is_refused():
    metric = torch.randn(1, 21, 6, generator=torch.Generator().manual_seed(0))
    partitions = {k: agglomerative_clustering(metric, 12, 1, k).dest.tolist() for k in LINKAGES}
    assert len({str(p) for p in partitions.values()}) > 1
    with pytest.raises(ConfigError, match="linkage='ward' is invalid; allowed: 'single', 'complete', 'average'"):
        agglomerative_clustering(metric, 2, 1, "ward")
    with pytest.raises(ConfigError, match="atc: linkage='ward' is invalid"):
        tokenreduce.apply(make_model("test_vit"), "atc", r=2, linkage="ward")
    assert agglomerative_clustering(metric, 0, 1) is None
    assert agglomerative_clustering(metric, 50, 1).n_out == 2  # all tokens in one cluster, the class token apart


def test_the_reducer_keeps_its_ratio_at_its_layers_and_merges_by_size():
    model = tokenreduce.apply(make_model("test_vit"), "atc", ratio=0.7, layers=[1, 3], trace_source=True)
    x = images_for(model)
    with torch.no_grad():
        model(x)
    stats = tokenreduce.stats(model)
    assert stats["removed"][1] == 30 and stats["removed"][3] == 21 and sum(stats["removed"]) == 51
    state = model._tokenreduce.last_state
    assert torch.equal(state.sizes.sum(1), torch.full((len(x), 1), 101.0))  # 100 patches and the class token
    assert tokenreduce.reducer_of(model).params()["linkage"] == "average"
