"""compose: different reducers in different layers, one pass, one stats, one MAC count."""

import pytest
import torch
from conftest import counted_flops, images_for, make_model

import tokenreduce
from tokenreduce.errors import ConfigError

ALL = list(range(6))  # test_vit has 6 blocks


def run(reducer: str, **params):
    model = tokenreduce.apply(make_model("test_vit"), reducer, **params)
    with torch.no_grad():
        out = model(images_for(model))
    return out, tokenreduce.stats(model)


@pytest.mark.parametrize("name, params", [
    ("tome", {"r": 9}), ("pitome", {"ratio": 0.8}), ("tofu", {"r": 9}), ("atc", {"r": 9}),
    ("evit", {"ratio": 0.7, "layers": [1, 3]}), ("topk", {"ratio": 0.7, "layers": [1, 3]}),
])
def test_one_reducer_in_every_part_is_that_reducer(name, params):
    """The same reducer split over two parts (or in one) gives that reducer's output and counts."""
    want, want_stats = run(name, **params)
    layers = params.get("layers", ALL)
    first, second = [x for x in ALL if x < 2], [x for x in ALL if x >= 2]
    rest = {k: v for k, v in params.items() if k != "layers"}
    for parts in ([{"name": name, "layers": layers, **rest}],
                  [{"name": name, "layers": [x for x in layers if x in first], **rest},
                   {"name": name, "layers": [x for x in layers if x in second], **rest}]):
        parts = [p for p in parts if p["layers"]]
        prop = tokenreduce.reducer_class(name)(**rest).prop_attn if name != "tome" else True
        got, stats = run("compose", parts=parts, prop_attn=prop)
        assert stats["tokens"] == want_stats["tokens"] and stats["macs"] == want_stats["macs"]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_parts_see_the_tokens_the_parts_before_them_left():
    _, stats = run("compose", parts=[{"name": "topk", "layers": [1], "ratio": 0.5},
                                     {"name": "tome", "layers": [2, 3, 4, 5], "r": 9},
                                     {"name": "evit", "layers": [0], "ratio": 0.8}])
    # 100 patches: evit keeps 80 (+1 fused) at 0, topk removes floor(81 - 40.5) = 40 at 1, tome 9 a
    # layer, at most half
    assert stats["removed"] == [19, 40, 9, 9, 9, 7]
    assert stats["tokens"] == [101, 82, 42, 33, 24, 15, 8]


def test_composed_macs_equal_the_flop_counter():
    model = tokenreduce.apply(make_model("test_vit"), "compose",
                              parts=[{"name": "topk", "layers": [1], "ratio": 0.7}, {"name": "atc", "layers": [3], "r": 20},
                                     {"name": "tome", "layers": [4, 5], "r": 9}])
    x = images_for(model)
    flops = counted_flops(model, x)
    stats = tokenreduce.stats(model)
    assert stats["macs"] * 2 * len(x) == flops
    assert stats["macs_parts"]["reducer"] > 0


@pytest.mark.parametrize("parts, words", [
    ([], "parts=[] is invalid"),
    ([{"name": "tome", "r": 2}], "parts[0]="),
    ([{"name": "tome", "layers": [0, 1], "r": 2}, {"name": "topk", "layers": [1], "ratio": 0.5}],
     "layer 1 is in parts[0] and parts[1]"),
    ([{"name": "mctf", "layers": [1], "r": 2}], "parts[0] is mctf, which cannot be composed"),
    ([{"name": "tome", "layers": [9], "r": 2}], "layers [9] reach beyond the model's 6 blocks"),
    ([{"name": "evit", "layers": [1]}], None),  # fine on test_vit (it has a class token)
    ([{"name": "tome", "layers": [1], "q": 2}], "tome: unknown parameter(s) q"),
])
def test_bad_parts_are_refused_before_any_compute(parts, words):
    model = make_model("test_vit")
    if words is None:
        tokenreduce.apply(model, "compose", parts=parts)
        return
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        tokenreduce.apply(model, "compose", parts=parts)
    assert not hasattr(model, "_tokenreduce")
