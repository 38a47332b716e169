"""ToFu: ToMe's selection, prune-in-matching in the early layers and MLERP in the later ones, checked
layer by layer on real timm models; the methods.md invariants, fixtures and errors."""

import pytest
import torch
from conftest import images_for, make_model, narrow_vit_b_geometry
from reduction_checks import check_invariants, duplicate_pairs_through_two_blocks, groups, record_layers

import tokenreduce
from tokenreduce.core.matching import bipartite_soft_matching
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import Signals
from tokenreduce.reducers.tofu import ToFu

KEEP_090 = [196, 177, 160, 144, 130, 117, 106, 96, 87, 79, 72, 65, 59]
KEEP_0925 = [196, 182, 169, 157, 146, 136, 126, 117, 109, 101, 94, 87, 81]


def combination_of(entry, b, slot, members):
    """'prune' when the output token is exactly one member's input value, else 'mlerp' after checking
    that it has the largest member norm and the direction of the size-weighted mean."""
    out = entry["x_out"][b, slot]
    x_in, sizes = entry["x_in"][b], entry["sizes_in"][b]
    if any(torch.equal(out, x_in[m]) for m in members) and len(members) > 1:
        return "prune"
    mean = (x_in[members] * sizes[members]).sum(0) / sizes[members].sum()
    largest = x_in[members].norm(dim=-1).max()
    torch.testing.assert_close(out.norm(), largest, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.dot(out, mean) / (out.norm() * mean.norm()), torch.tensor(1.0), rtol=0, atol=1e-5)
    return "mlerp" if len(members) > 1 else "alone"


@pytest.mark.parametrize("ratio, fixture", [(0.9, KEEP_090), (0.925, KEEP_0925)])
def test_token_counts_match_the_keep_ratio_fixtures(ratio, fixture):
    model = tokenreduce.apply(narrow_vit_b_geometry(), "tofu", ratio=ratio)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert tokenreduce.stats(model)["tokens"] == [t + 1 for t in fixture]


def test_fixed_r_schedule():
    model = tokenreduce.apply(narrow_vit_b_geometry(), "tofu", r=13)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert tokenreduce.stats(model)["tokens"][-1] == 41  # as ToMe r=13


def test_default_prune_layers_are_the_first_half_and_the_middle():
    reducer = ToFu(r=1)
    assert [reducer.prunes_at(layer, 12) for layer in range(12)] == [True] * 7 + [False] * 5
    assert [reducer.prunes_at(layer, 5) for layer in range(5)] == [True] * 3 + [False] * 2
    assert [ToFu(r=1, prune_layers=[4, 1]).prunes_at(layer, 6) for layer in range(6)] == [
        False, True, False, False, True, False]


@pytest.mark.parametrize("layer", [0, 5])
def test_selection_is_tomes_bipartite_matching(layer):
    g = torch.Generator().manual_seed(layer)
    keys, x = torch.randn(2, 15, 8, generator=g), torch.randn(2, 15, 6, generator=g)
    state = ReductionState.start(x, 1, [5] * 6, prop_attn=True, trace_source=True)
    state.begin_layer(15)
    out = ToFu(r=5).reduce(x, Signals(keys=keys), state, layer, 5)
    assert out.shape == (2, 10, 6)
    assert torch.equal(state.source, bipartite_soft_matching(keys, 5, 1).dest)


@pytest.mark.parametrize("name, prune_layers, adds_size", [
    ("test_vit", None, True), ("test_vit2", None, False), ("test_vit3", [1, 3], True),
    ("test_vit4", [], True), ("deit_tiny_distilled_patch16_224", None, True)])
def test_each_layer_prunes_or_mlerps_and_keeps_the_invariants(name, prune_layers, adds_size):
    model = make_model(name)
    reducer = ToFu(ratio=0.7, prune_layers=prune_layers, prune_adds_size=adds_size, trace_source=True)
    records = record_layers(reducer)
    tokenreduce.apply(model, reducer)
    x = images_for(model, batch=2)
    with torch.no_grad():
        model(x)
    depth = len(model.blocks)
    total = model._tokenreduce.last_state.records[0].tokens_attn
    assert [e["layer"] for e in records] == list(range(depth))
    for entry in records:
        prunes = reducer.prunes_at(entry["layer"], depth)
        assert prunes == (entry["layer"] in prune_layers if prune_layers is not None else entry["layer"] <= depth // 2)
        check_invariants(entry, model.num_prefix_tokens, total, sizes_are_patch_counts=adds_size)
        for b in range(2):
            kinds = set()
            for slot, members in enumerate(groups(entry, b)):
                kind = combination_of(entry, b, slot, members)
                kinds.add(kind)
                sizes_in = entry["sizes_in"][b, :, 0]
                if kind == "prune" and not adds_size:
                    keeper = [m for m in members if torch.equal(entry["x_out"][b, slot], entry["x_in"][b, m])]
                    assert entry["sizes_out"][b, slot, 0] == sizes_in[keeper[0]]
                else:
                    assert entry["sizes_out"][b, slot, 0] == sizes_in[members].sum()
            assert kinds - {"alone"} == ({"prune"} if prunes else {"mlerp"})


def test_mlerp_keeps_norms_that_averaging_shrinks():
    model = make_model("test_vit")
    x = images_for(model)
    norms = {}
    for label, reducer in {"mlerp": ToFu(r=12, prune_layers=[]), "tome": "tome"}.items():
        tokenreduce.apply(model, reducer, **({"r": 12} if reducer == "tome" else {}))
        recorded = record_layers(tokenreduce.reducer_of(model))
        with torch.no_grad():
            model(x)
        norms[label] = recorded[0]["x_out"].norm(dim=-1).mean()
    assert norms["mlerp"] > norms["tome"]


@pytest.mark.parametrize("prune_layers", [None, []])
def test_merging_duplicate_tokens_with_proportional_attention_changes_nothing(prune_layers):
    model = make_model("test_vit2")
    reduced, full = duplicate_pairs_through_two_blocks(model, ToFu(r=1, prune_layers=prune_layers))
    torch.testing.assert_close(reduced, full, rtol=1e-5, atol=1e-5)


def test_parameters_change_the_output():
    model = make_model("test_vit")
    x = images_for(model)
    outputs = {}
    for label, params in {"default": {}, "all mlerp": {"prune_layers": []}, "all prune": {"prune_layers": [0, 1, 2, 3, 4, 5]},
                          "no size": {"prune_adds_size": False}, "no prop": {"prop_attn": False}}.items():
        tokenreduce.apply(model, "tofu", ratio=0.7, **params)
        with torch.no_grad():
            outputs[label] = model(x)
    for label in ("all mlerp", "all prune", "no size", "no prop"):
        assert not torch.allclose(outputs["default"], outputs[label]), label


@pytest.mark.parametrize("params, words", [
    ({"ratio": 0.0}, ["ratio=0.0", "(0, 1]"]),
    ({"ratio": 1.2}, ["ratio=1.2", "(0, 1]"]),
    ({"r": -1}, ["r=-1", ">= 0"]),
    ({"r": 4, "ratio": 0.9}, ["either", "r=4", "ratio=0.9"]),
    ({"r": 2, "prune_layers": "early"}, ["prune_layers='early'", "layer indices"]),
    ({"r": 2, "prune_layers": [0, -1]}, ["prune_layers=[0, -1]", ">= 0"]),
    ({"r": 2, "prune_layers": [0, 6]}, ["prune_layers=[0, 6]", "6 blocks", "0 .. 5"]),
    ({"r": 2, "prune_adds_size": 1}, ["prune_adds_size=1", "true or false"]),
    ({"r": 2, "mlerp_eps": 0}, ["mlerp_eps=0", "> 0"]),
    ({"r": 2, "mlerp_eps": float("nan")}, ["mlerp_eps=nan", "> 0"]),
    ({"r": 2, "trace_source": None}, ["trace_source=None"]),
    ({"r": 2, "eps": 1e-6}, ["unknown parameter", "eps", "mlerp_eps"]),
])
def test_bad_input_fails_before_touching_the_model(params, words):
    model = make_model("test_vit")
    with pytest.raises(ConfigError) as err:
        tokenreduce.apply(model, "tofu", **params)
    for word in words:
        assert word in str(err.value)
    assert tokenreduce.reducer_of(model) is None
