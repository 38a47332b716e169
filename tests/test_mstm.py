"""MSTM-like: crucial tokens by class-token attention, every other token merged into its most similar
crucial one (nothing lost), and the multi-scale fusion that starts as the identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import images_for, make_model, narrow_vit_b_geometry, run
from merge_checks import check_every_merge

import tokenreduce
from tokenreduce.core.state import ReductionState
from tokenreduce.reducers.base import Signals, create_reducer
from tokenreduce.reducers.mstm import MultiScaleFusion, crucial_assignment


def test_keeping_everything_is_the_identity():
    model = make_model("test_vit")
    images = images_for(model)
    expected = run(model, images)
    tokenreduce.apply(model, "mstm", ratio=1.0, layers=[1, 3])
    assert torch.allclose(run(model, images), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["test_vit2", "test_vit3", "test_vit4"])
def test_models_without_a_class_token_are_refused(name):
    with pytest.raises(tokenreduce.ConfigError, match="no class token"):
        tokenreduce.apply(make_model(name), "mstm", layers=[1, 2])


def test_counts_sizes_and_sources(monkeypatch):
    model = narrow_vit_b_geometry()
    tokenreduce.apply(model, "mstm", trace_source=True)  # keep 0.7 at 3, 6, 9
    checked = check_every_merge(monkeypatch)
    run(model, torch.randn(2, 3, 224, 224))
    assert checked == [139, 98, 69]
    state = model._tokenreduce.last_state
    assert tokenreduce.stats(model)["tokens"] == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 3
    assert torch.all(state.sizes[:, 1:].sum(dim=1) == 196)  # nothing discarded
    assert torch.all(state.source[:, 0] == 0) and int(state.source.max()) < 69
    counts = torch.zeros(2, 69).scatter_add_(1, state.source, torch.ones(2, 197))
    assert torch.equal(counts, state.sizes[..., 0])


def test_crucial_assignment_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    importance = torch.rand(2, 20, generator=gen)
    keys = torch.randn(2, 21, 6, generator=gen)
    a = crucial_assignment(importance, keys, 12, num_prefix=1)
    assert a.n_out == 13
    for s in range(2):
        ranked = sorted(range(20), key=lambda i: -float(importance[s, i]))
        crucial = sorted(i + 1 for i in ranked[:12])
        expected = [0] * 21
        for slot, token in enumerate(crucial):
            expected[token] = slot + 1
        for token in range(1, 21):
            if token not in crucial:
                sims = [float(F.cosine_similarity(keys[s, token], keys[s, c], dim=0)) for c in crucial]
                expected[token] = sims.index(max(sims)) + 1
        assert a.dest[s].tolist() == expected
        assert a.merged[s].tolist() == [t != 0 and t not in crucial for t in range(21)]


def test_merge_weights_importance_and_size():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, 4, generator=gen)
    keys = torch.randn(1, 9, 4, generator=gen)
    cls_attn = torch.rand(1, 9, generator=gen)
    sizes = torch.randint(1, 5, (1, 9, 1), generator=gen).float()
    attn = torch.zeros(1, 1, 9, 9)
    attn[:, 0, 0] = cls_attn
    reducer = create_reducer("mstm", ratio=0.5, fusion=False)
    state = ReductionState.start(x, 1, [4], prop_attn=True, trace_source=False)
    state.sizes = sizes
    state.begin_layer(9)
    out = reducer.reduce(x, Signals(keys=keys, attn=attn), state, 0, 4)
    assignment = crucial_assignment(cls_attn[:, 1:], keys, 4, 1)
    for slot in range(5):
        members = [i for i in range(9) if assignment.dest[0, i] == slot]
        w = [float(cls_attn[0, i] * sizes[0, i]) for i in members]
        expected = sum(wi * x[0, i].double() for wi, i in zip(w, members, strict=True)) / sum(w)
        assert torch.allclose(out[0, slot].double(), expected, atol=1e-6)
        assert state.sizes[0, slot, 0] == sum(sizes[0, i, 0] for i in members)
    assert state.records[-1].reducer_macs == 4 * 4 * 4  # 4 non-crucial x 4 crucial x key dim


def test_fusion_starts_as_the_identity_and_then_matters():
    model = make_model("test_vit")
    images = images_for(model)
    tokenreduce.apply(model, "mstm", layers=[2, 4], fusion=False)
    without = run(model, images)
    tokenreduce.apply(model, "mstm", layers=[2, 4])
    assert torch.equal(run(model, images), without)
    fusion = model.token_reducer.fusion
    assert "token_reducer.fusion.proj.weight" in model.state_dict()
    # 5 x 5 coarse tokens through a 64 x 64 projection, then layer 4's similarities (ratio 0.7)
    reducer_macs = [rec.reducer_macs for rec in model._tokenreduce.last_state.records]
    assert reducer_macs[2] == 25 * 64 * 64 + 30 * 70 * 32 and reducer_macs[4] == 21 * 49 * 32
    torch.nn.init.normal_(fusion.proj.weight, std=0.1)
    assert not torch.allclose(run(model, images), without)
    model.zero_grad()
    model(images).sum().backward()
    assert fusion.proj.weight.grad.abs().sum() > 0


def test_fusion_adds_the_projected_window_mean():
    fusion = MultiScaleFusion(3, pool=2)
    torch.nn.init.eye_(fusion.proj.weight)
    fusion.norm = torch.nn.Identity()
    x = torch.randn(1, 1 + 9, 3)  # a 3 x 3 grid: windows of 4, 2, 2 and 1 patches
    out = fusion(x, num_prefix=1)
    grid = x[0, 1:].reshape(3, 3, 3)
    assert torch.equal(out[0, 0], x[0, 0])
    for row in range(3):
        for col in range(3):
            r0, c0 = 2 * (row // 2), 2 * (col // 2)
            window = grid[r0 : r0 + 2, c0 : c0 + 2].reshape(-1, 3)
            assert torch.allclose(out[0, 1 + 3 * row + col], grid[row, col] + window.mean(dim=0), atol=1e-6)


def test_fusion_needs_a_square_grid():
    model = make_model("test_vit", dynamic_img_size=True)
    tokenreduce.apply(model, "mstm", layers=[1])
    with pytest.raises(tokenreduce.ConfigError, match="square"):
        run(model, torch.randn(1, 3, 160, 128))
    tokenreduce.apply(model, "mstm", layers=[1], fusion=False)
    assert run(model, torch.randn(1, 3, 160, 128)).shape == (1, 1000)


def test_samples_do_not_depend_on_each_other():
    model = make_model("test_vit")
    tokenreduce.apply(model, "mstm", ratio=0.6, layers=[1, 3])
    images = images_for(model, batch=3)
    alone = run(model, images[:1])
    assert torch.allclose(alone, run(model, images)[:1], atol=1e-5)
    assert torch.allclose(alone, run(model, images[[0, 2]])[:1], atol=1e-5)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"ratio": 0}, "ratio=0"),
        ({"ratio": None}, "ratio=None"),
        ({"fusion": 1}, "fusion=1"),
        ({"fusion_pool": 1}, "fusion_pool=1"),
        ({"layers": [-3]}, r"layers=\[-3\]"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(tokenreduce.ConfigError, match=match):
        create_reducer("mstm", **params)
