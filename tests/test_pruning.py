"""Pruning baselines: random, Top-K, EViT and norm against brute-force selections, their counts,
the fused EViT token, reproducibility, attention only where needed, and bad parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, images_for, make_model, run
from merge_checks import check_every_merge

import tokenreduce
from tokenreduce.core.merge import keep_assignment
from tokenreduce.core.schedule import Schedule, no_cap
from tokenreduce.core.state import ReductionState
from tokenreduce.reducers.base import Signals, create_reducer

PRUNERS = ("random", "topk", "evit", "norm")
CLS_ATTENTION = ("topk", "evit")


def supports(name: str, model_name: str) -> bool:
    return name not in CLS_ATTENTION or model_name == "test_vit"  # the others have registers, no CLS


@pytest.mark.parametrize("model_name", TINY_MODELS)
@pytest.mark.parametrize("name", PRUNERS)
def test_keeping_everything_is_the_identity(name, model_name):
    model = make_model(model_name)
    if not supports(name, model_name):
        with pytest.raises(tokenreduce.ConfigError, match="no class token"):
            tokenreduce.apply(model, name, layers=[1, 2])
        return
    images = images_for(model)
    expected = run(model, images)
    tokenreduce.apply(model, name, ratio=1.0, layers=[1, 2])
    assert torch.allclose(run(model, images), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", PRUNERS)
def test_token_counts_at_the_reference_setting(narrow_vit, name):
    tokenreduce.apply(narrow_vit, name)  # keep 0.7 at layers 3, 6, 9
    run(narrow_vit, torch.randn(2, 3, 224, 224))
    st = tokenreduce.stats(narrow_vit)
    tokenreduce.remove(narrow_vit)
    if name == "evit":
        # ceil(.7*196)=138 kept + fused -> 140; ceil(.7*139)=98 + fused -> 100; ceil(.7*99)=70 + fused -> 72
        assert st["tokens"] == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 3
    else:
        # ceil(.7*196)=138 -> 139; ceil(.7*138)=97 -> 98; ceil(.7*97)=68 -> 69
        assert st["tokens"] == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 3


def test_schedule_refill_and_no_cap():
    assert Schedule(ratio=0.7, layers=(3, 6, 9)).removal_counts(12, 196, no_cap, refill=1) == (
        [0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0]
    )
    assert Schedule(ratio=0.2).removal_counts(2, 100, no_cap) == [80, 16]  # no half cap for pruning


def prune_once(name, x, cls_attn, removal, sizes=None, **params):
    """Run the reducer's `reduce` on tokens x [B, N, C] with class-token attention [B, N]."""
    reducer = create_reducer(name, **params)
    state = ReductionState.start(x, 1, [removal], prop_attn=False, trace_source=True)
    state.sizes = sizes
    state.begin_layer(x.shape[1])
    attn = torch.zeros(x.shape[0], 1, x.shape[1], x.shape[1])
    attn[:, 0, 0] = cls_attn
    return reducer.reduce(x, Signals(attn=attn), state, 0, removal), state


def brute_force_keep(scores, num_keep):
    """Indices (1-based, after the CLS) of the num_keep largest scores, in index order."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    return sorted(i + 1 for i in ranked[:num_keep])


def test_topk_keeps_exactly_the_highest_attention_tokens():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 21, 8, generator=gen)
    cls_attn = torch.rand(3, 21, generator=gen).softmax(dim=-1)
    out, state = prune_once("topk", x, cls_attn, removal=7)
    assert out.shape == (3, 14, 8)
    for s in range(3):
        kept = brute_force_keep(cls_attn[s, 1:].tolist(), 13)
        assert torch.equal(out[s], x[s, [0] + kept])
        dropped = [i for i in range(1, 21) if i not in kept]
        assert state.source[s, dropped].tolist() == [14] * 7  # dropped patches belong to no token


def test_norm_keeps_the_largest_norms():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 17, 8, generator=gen) * torch.rand(2, 17, 1, generator=gen)
    out, _ = prune_once("norm", x, torch.zeros(2, 17), removal=6)
    for s in range(2):
        kept = brute_force_keep([float(v.norm()) for v in x[s, 1:]], 10)
        assert torch.equal(out[s], x[s, [0] + kept])


def test_evit_fuses_the_dropped_tokens_by_their_attention():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 21, 8, generator=gen)
    cls_attn = torch.rand(2, 21, generator=gen).softmax(dim=-1)
    sizes = torch.randint(1, 4, (2, 21, 1), generator=gen).float()
    sizes[:, 0] = 1
    out, state = prune_once("evit", x, cls_attn, removal=8, sizes=sizes)
    assert out.shape == (2, 14, 8)  # CLS + 12 kept + 1 fused
    for s in range(2):
        kept = brute_force_keep(cls_attn[s, 1:].tolist(), 12)
        dropped = [i for i in range(1, 21) if i not in kept]
        assert torch.equal(out[s, :13], x[s, [0] + kept])  # kept tokens untouched
        fused = sum(float(cls_attn[s, i]) * x[s, i].double() for i in dropped) / sum(float(cls_attn[s, i]) for i in dropped)
        assert torch.allclose(out[s, 13].double(), fused, atol=1e-6)
        assert state.sizes[s, 13, 0] == sum(sizes[s, i, 0] for i in dropped)  # nothing lost
        assert torch.equal(state.sizes[s, :13], sizes[s, [0] + kept])


def test_evit_conserves_sizes_through_the_model(narrow_vit, monkeypatch):
    tokenreduce.apply(narrow_vit, "evit", trace_source=True)
    checked = check_every_merge(monkeypatch)
    run(narrow_vit, torch.randn(2, 3, 224, 224))
    assert checked == [140, 100, 72]
    state = narrow_vit._tokenreduce.last_state
    tokenreduce.remove(narrow_vit)
    assert torch.all(state.sizes[:, 1:].sum(dim=1) == 196)
    assert int(state.source.max()) < state.final_tokens and torch.all(state.source[:, 0] == 0)
    counts = torch.zeros(2, state.final_tokens).scatter_add_(1, state.source, torch.ones(2, 197))
    assert torch.equal(counts, state.sizes[..., 0])


@pytest.mark.parametrize("name", ["random", "topk", "norm"])
def test_pruned_sizes_and_sources(name):
    model = make_model("test_vit")
    tokenreduce.apply(model, name, ratio=0.5, layers=[1, 3], trace_source=True)
    run(model, images_for(model))
    state = model._tokenreduce.last_state
    assert state.final_tokens == 1 + 25
    assert torch.all(state.sizes == 1)  # dropped tokens are gone, kept ones still one patch each
    assert torch.all(state.source[:, 0] == 0)  # the class token stays first
    kept = state.source < state.final_tokens
    assert kept.sum(dim=1).tolist() == [26, 26]


def test_random_is_reproducible_per_sample_and_batch_independent():
    model = make_model("test_vit")
    tokenreduce.apply(model, "random", ratio=0.5, layers=[1], seed=3, trace_source=True)
    image = images_for(model, batch=1)
    twice = torch.cat([image, image])
    first = run(model, twice)
    sources = model._tokenreduce.last_state.source.clone()
    assert torch.equal(run(model, twice), first)  # same seed, same subsets, every pass
    assert not torch.equal(sources[0], sources[1])  # per sample: the same image keeps another subset
    assert torch.allclose(run(model, image), first[:1], atol=1e-6)  # sample 0 ignores the batch
    tokenreduce.apply(model, "random", ratio=0.5, layers=[1], seed=4, trace_source=True)
    run(model, twice)
    assert not torch.equal(model._tokenreduce.last_state.source, sources)
    tokenreduce.apply(model, "random", ratio=0.5, layers=[1], seed=None)
    torch.manual_seed(7)
    a = run(model, twice)
    torch.manual_seed(7)
    assert torch.equal(run(model, twice), a)


@pytest.mark.parametrize("name", ["topk", "evit", "norm"])
def test_samples_do_not_depend_on_each_other(name):
    model = make_model("test_vit")
    tokenreduce.apply(model, name, ratio=0.6, layers=[1, 3])
    images = images_for(model, batch=3)
    alone = run(model, images[:1])
    assert torch.allclose(alone, run(model, images)[:1], atol=1e-5)
    assert torch.allclose(alone, run(model, images[[0, 2]])[:1], atol=1e-5)


@pytest.mark.parametrize("name, fused_calls", [("topk", 3), ("norm", 6), ("random", 6)])
def test_attention_probabilities_only_where_needed(monkeypatch, name, fused_calls):
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = make_model("test_vit")
    tokenreduce.apply(model, name, ratio=0.5, layers=[1, 2, 4])
    run(model, images_for(model))
    assert len(calls) == fused_calls  # Top-K's three acting blocks compute probabilities explicitly


def test_keep_assignment():
    keep = torch.tensor([[True, False, True, True, False], [True, True, False, False, True]])
    a = keep_assignment(keep)
    assert a.n_out == 3 and a.dest.tolist() == [[0, 3, 1, 2, 3], [0, 1, 3, 3, 2]]
    fused = keep_assignment(keep, fuse=True)
    assert fused.n_out == 4 and fused.dest.tolist() == a.dest.tolist() and torch.equal(fused.merged, ~keep)
    assert keep_assignment(torch.ones(1, 3, dtype=torch.bool), fuse=True).n_out == 3  # nothing to fuse


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("topk", {"ratio": 0}, "ratio=0"),
        ("evit", {"ratio": 1.5}, "ratio=1.5"),
        ("norm", {"ratio": None}, "ratio=None"),
        ("random", {"seed": -1}, "seed=-1"),
        ("random", {"seed": "a"}, "seed='a'"),
        ("topk", {"layers": [3, -1]}, r"layers=\[3, -1\]"),
        ("evit", {"keep_rate": 0.7}, "unknown parameter"),
    ],
)
def test_bad_parameters(name, params, match):
    with pytest.raises(tokenreduce.ConfigError, match=match):
        create_reducer(name, **params)


def test_layers_beyond_the_model():
    with pytest.raises(tokenreduce.ConfigError, match="layers"):
        tokenreduce.apply(make_model("test_vit"), "evit")  # 6 blocks; layer 9 does not exist
