"""ToMe on real timm models: published token counts, the invariants of methods.md, MACs, errors."""

import copy

import pytest
import torch
from conftest import TINY_MODELS, counted_flops, images_for, make_model, narrow_vit_b_geometry
from reduction_checks import check_grad_checkpointing

import tokenreduce
from tokenreduce.adapters.timm_vit import ReducedViT
from tokenreduce.core.merge import source_matrix
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.tome import ToMe


@pytest.mark.parametrize("params, final", [({"r": 8}, 101), ({"r": 13}, 41), ({"r": 16}, 11),
                                           ({"r": 16, "inflect": -1}, 10), ({"r": (16, -1)}, 10)])
def test_published_token_counts(params, final):
    model = tokenreduce.apply(narrow_vit_b_geometry(), "tome", **params)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    tokens = tokenreduce.stats(model)["tokens"]
    assert len(tokens) == 13 and tokens[0] == 197 and tokens[-1] == final
    if params.get("inflect") == -1 or params["r"] == (16, -1):
        assert tokenreduce.stats(model)["removed"] == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]


class RecordingToMe(ToMe):
    """ToMe that keeps the sizes and source map after every layer, for invariant checks."""

    def reduce(self, x, signals, state, layer, removal):
        before = x[:, : state.num_prefix].clone()
        x = super().reduce(x, signals, state, layer, removal)
        state.extras.setdefault("after", []).append((state.sizes.clone(), state.source.clone(), before, x))
        return x


@pytest.mark.parametrize("name", TINY_MODELS + ("deit_tiny_distilled_patch16_224",))
def test_sizes_sources_and_prefix_tokens_after_every_layer(name):
    model = make_model(name)
    model = tokenreduce.apply(model, RecordingToMe(r=7, trace_source=True))
    x = images_for(model, batch=3)
    with torch.no_grad():
        model(x)
    state = model._tokenreduce.last_state
    n_in = state.records[0].tokens_attn
    p = model.num_prefix_tokens
    assert len(state.extras["after"]) == len(model.blocks)
    for sizes, source, prefix_before, out in state.extras["after"]:
        assert torch.equal(sizes.sum(1), torch.full((3, 1), float(n_in)))  # nothing lost
        mat = source_matrix(source, sizes.shape[1])
        assert torch.equal(mat.sum(1), torch.ones(3, n_in))  # each patch in exactly one token
        assert torch.equal(mat.sum(2, keepdim=True), sizes)
        assert torch.equal(source[:, :p], torch.arange(p).expand(3, -1))  # prefix tokens stay first
        assert torch.equal(sizes[:, :p], torch.ones(3, p, 1))  # and never absorb anything
        assert torch.equal(out[:, :p], prefix_before)  # merging leaves their values untouched


def test_grad_checkpointing_gives_the_same_gradients():
    model = tokenreduce.apply(make_model("test_vit2"), "tome", r=9).train()
    check_grad_checkpointing(model, images_for(model))


@pytest.mark.parametrize("name", [*TINY_MODELS, "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("r", [0, 7])
def test_analytic_macs_equal_flop_counter(name, r):
    """FlopCounterMode counts 2 FLOPs per multiply-accumulate of every matmul and convolution,
    with attention decomposed into matmuls by the math kernel; the analytic count covers the same
    operations (patch embedding, linear layers, q.k^T, attention.v, ToMe's similarity matrix,
    pooling attention and head), so the two agree exactly."""
    model = tokenreduce.apply(make_model(name), "tome", r=r)
    x = images_for(model, batch=2)
    flops = counted_flops(model, x)
    stats = tokenreduce.stats(model)
    assert stats["macs"] * 2 * 2 == flops
    assert (stats["macs_parts"]["reducer"] > 0) == (r > 0)


def test_fewer_tokens_fewer_macs():
    model = narrow_vit_b_geometry()
    macs = []
    for r in (0, 8, 13, 16):
        tokenreduce.apply(model, "tome", r=r)
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        macs.append(tokenreduce.stats(model)["macs"])
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 4


def test_apply_twice_replaces_the_reducer_without_double_patching():
    model = make_model("test_vit")
    x = images_for(model)
    tokenreduce.apply(model, "tome", r=3)
    tokenreduce.apply(model, "tome", r=9)
    assert type(model).__mro__.count(ReducedViT) == 1
    assert tokenreduce.reducer_of(model).params()["r"] == 9
    fresh = tokenreduce.apply(make_model("test_vit"), "tome", r=9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)
    tokenreduce.remove(model)
    tokenreduce.remove(model)  # removing twice is harmless
    assert type(model).__name__ == "VisionTransformer"


def test_patched_model_deepcopies_and_keeps_its_state_dict_keys():
    model = make_model("test_vit")
    keys = set(model.state_dict())
    tokenreduce.apply(model, "tome", r=5)
    assert set(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    x = images_for(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_source_map_is_off_by_default_and_merge_mode_mean_differs():
    model = tokenreduce.apply(make_model("test_vit"), "tome", r=9)
    x = images_for(model)
    with torch.no_grad():
        wavg = model(x)
        assert model._tokenreduce.last_state.source is None
        tokenreduce.apply(model, "tome", r=9, mode="mean")
        mean = model(x)
        tokenreduce.apply(model, "tome", r=9, prop_attn=False)
        no_prop = model(x)
    assert not torch.allclose(wavg, mean) and not torch.allclose(wavg, no_prop)


@pytest.mark.parametrize("call, words", [
    (lambda m: tokenreduce.apply(m, "tomee", r=1), ["'tomee'", "available", "tome", "none"]),
    (lambda m: tokenreduce.apply(m, "tome", r=-1), ["r=-1", ">= 0"]),
    (lambda m: tokenreduce.apply(m, "tome", ratio=0.0), ["ratio=0.0", "(0, 1]"]),
    (lambda m: tokenreduce.apply(m, "tome", ratio=1.2), ["ratio=1.2", "(0, 1]"]),
    (lambda m: tokenreduce.apply(m, "tome", rr=4), ["unknown parameter", "rr", "allowed", "inflect"]),
    (lambda m: tokenreduce.apply(m, "tome", mode="max"), ["mode='max'", "'wavg'"]),
    (lambda m: tokenreduce.apply(m, "tome", prop_attn="yes"), ["prop_attn='yes'"]),
    (lambda m: tokenreduce.apply(m, "tome", r=[1] * 7), ["7 entries", "6 blocks"]),
    (lambda m: tokenreduce.apply(m, ToMe(r=2), r=3), ["reducer instance"]),
])
def test_bad_input_fails_before_touching_the_model(call, words):
    model = make_model("test_vit")
    with pytest.raises(ConfigError) as err:
        call(model)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert type(model).__name__ == "VisionTransformer" and not hasattr(model, "_tokenreduce")


def test_stats_needs_a_reducer_and_a_pass():
    model = make_model("test_vit")
    with pytest.raises(ConfigError, match="no reducer"):
        tokenreduce.stats(model)
    tokenreduce.apply(model, "tome", r=1)
    with pytest.raises(ConfigError, match="has not run a forward pass"):
        tokenreduce.stats(model)


def test_registry_lists_and_describes_reducers():
    assert {"none", "tome"} <= set(tokenreduce.available())
    defaults = tokenreduce.reducer_defaults("tome")
    assert defaults["r"] == 0 and defaults["prop_attn"] is True and defaults["trace_source"] is False
    assert tokenreduce.create_reducer("tome", r=4).params()["r"] == 4


def test_a_reducer_follows_the_model_dtype_and_mode():
    model = make_model("test_vit").to(torch.bfloat16)
    reducer = tokenreduce.apply(model, "dynamicvit", ratios=[0.5], layers=[2]).token_reducer
    assert not reducer.training
    assert {p.dtype for p in reducer.parameters()} == {torch.bfloat16}
    model.train()
    assert reducer.training
