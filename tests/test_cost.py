"""Matched cost: match_macs finds the strength whose MACs come closest to a fraction of the baseline's."""

from __future__ import annotations

import pytest
import torch
from conftest import narrow_vit_b_geometry

import tokenreduce
from tokenreduce.cost import RATIO_STEP, searchable
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import reducer_class

STAGED = {"mstm": {"fusion": False},  # the rest take their defaults (layers 3, 6, 9 of 12)
          "ppt": {"layers": [1, 3, 5]},  # at 3, 6, 9 its at-most-half steps cannot reach 0.5 of the MACs
          "zerotprune": {"layers": [1, 3, 5]}}  # in every layer, r's steps are too coarse on 49 patches


@pytest.fixture(scope="module")
def model():
    # 12 blocks (the staged layers 3, 6, 9 exist) and 7x7 patches, so each pass takes milliseconds
    return narrow_vit_b_geometry(img_size=112)


def fraction_of(model, reducer: str, **params) -> float:
    baseline = getattr(model, "_test_baseline_macs", None) or tokenreduce.reducer_macs(model, "none")
    model._test_baseline_macs = baseline
    return tokenreduce.reducer_macs(model, reducer, **params) / baseline


def test_every_reducer_with_a_strength_is_searchable():
    assert set(searchable()) == {"tome", "pitome", "tofu", "mctf", "mstm", "evit", "topk", "norm", "random", "atc", "ppt",
                                  "zerotprune", "fastv", "pyramiddrop", "dart", "sparsevlm", "visionzip"}
    assert reducer_class("tome").strength[0].param == "ratio"  # finer steps than r on small models
    assert [s.param for s in reducer_class("mctf").strength] == ["r", "r"]


@pytest.mark.parametrize("name", ["tome", "pitome", "tofu", "mctf", "mstm", "evit", "topk", "norm", "random", "atc",
                                  "ppt", "zerotprune"])
@pytest.mark.parametrize("target", [0.75, 0.5])
def test_matched_setting_is_within_two_percent_and_the_closest_on_its_grid(model, name, target):
    fixed = STAGED.get(name, {})
    params, reached = tokenreduce.match_macs(model, name, target, **fixed)
    assert {k: params[k] for k in fixed} == fixed
    assert abs(reached - target) <= 0.02 * target
    assert reached == pytest.approx(fraction_of(model, name, **params), abs=1e-12)
    # brute force around the answer: no neighbouring grid value comes closer
    strength = reducer_class(name).strength[0]
    value = params[strength.param]
    step = 1 if strength.integer else RATIO_STEP
    for neighbour in (value - step, value + step):
        if strength.low <= neighbour <= (strength.high if strength.high is not None else 1e9) and neighbour > 0:
            other = fraction_of(model, name, **{**params, strength.param: round(neighbour, 6)})
            assert abs(reached - target) <= abs(other - target) + 1e-12


def test_integer_search_equals_exhaustive_search(model):
    params, reached = tokenreduce.match_macs(model, "tome", 0.6, tolerance=1.0, param="r")
    fractions = {r: fraction_of(model, "tome", r=r) for r in range(0, 50)}
    best = min(fractions, key=lambda r: (abs(fractions[r] - 0.6), r))
    assert params == {"r": best} and reached == pytest.approx(fractions[best])


def test_unreachable_target_is_a_clear_error(model):
    with pytest.raises(ConfigError, match=r"fraction=0.1 is out of reach for pitome: ratio from 0.5 to 1 gives "
                                          r"MAC fractions 0\.\d+ to 1\.000"):
        tokenreduce.match_macs(model, "pitome", 0.1)
    with pytest.raises(ConfigError, match="fraction=0 is invalid"):
        tokenreduce.match_macs(model, "tome", 0)
    with pytest.raises(ConfigError, match="fraction=1.5 is invalid"):
        tokenreduce.match_macs(model, "tome", 1.5)
    with pytest.raises(ConfigError, match="'dynamicvit' has no strength parameter"):
        tokenreduce.match_macs(model, "dynamicvit", 0.5)
    with pytest.raises(ConfigError, match="'none' has no strength parameter"):
        tokenreduce.match_macs(model, "none", 0.5)
    with pytest.raises(ConfigError, match="ratio=0.9 is the parameter being searched"):
        tokenreduce.match_macs(model, "evit", 0.5, ratio=0.9)
    with pytest.raises(ConfigError, match="param='keep' is not a strength of tome; allowed: r, ratio"):
        tokenreduce.match_macs(model, "tome", 0.5, param="keep")
    with pytest.raises(ConfigError, match="is not registered"):
        tokenreduce.match_macs(model, "nope", 0.5)


def test_the_model_is_left_as_it_came(model):
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    tokenreduce.apply(model, "tome", r=3)
    model.train()
    reducer = tokenreduce.reducer_of(model)
    model.eval()
    with torch.no_grad():
        before = model(images)
    model.train()
    tokenreduce.match_macs(model, "evit", 0.6)
    assert tokenreduce.reducer_of(model) is reducer and model.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), before)
    tokenreduce.remove(model)
    tokenreduce.match_macs(model, "tome", 0.6)
    assert tokenreduce.reducer_of(model) is None
