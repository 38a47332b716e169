"""The invariants of methods.md, for every registered reducer on every tiny timm model.

A new reducer gets these checks by adding one acting setting to SETTINGS.
"""

import pytest
import torch
from conftest import TINY_MODELS, counted_flops, images_for, make_model
from merge_checks import check_every_merge
from reduction_checks import check_bfloat16

import tokenreduce
from tokenreduce.errors import ConfigError

STAGES = [1, 3]  # the tiny models have 6 to 9 blocks
SETTINGS = {  # a setting that removes tokens on the tiny models (100 patches)
    "none": {},
    "tome": {"r": 9},
    "pitome": {"ratio": 0.8},
    "tofu": {"r": 9},
    "mctf": {"r": 8},
    "mstm": {"ratio": 0.7, "layers": STAGES},
    "evit": {"ratio": 0.7, "layers": STAGES},
    "topk": {"ratio": 0.7, "layers": STAGES},
    "norm": {"ratio": 0.7, "layers": STAGES},
    "random": {"ratio": 0.7, "layers": STAGES},
    "dynamicvit": {"ratios": [0.7, 0.5], "layers": STAGES},
    "atc": {"ratio": 0.7, "layers": STAGES},
    "compose": {"parts": [{"name": "atc", "layers": [1], "ratio": 0.8}, {"name": "tome", "layers": [2, 3], "r": 8}]},
    # every image pools here (its pruning, the other branch, is Top-K's: tests/test_ppt.py)
    "ppt": {"r": 9, "layers": STAGES, "threshold": 1.0},
    # merging only here, so every merge check applies (pruning too: tests/test_diffrate.py)
    "diffrate": {"prune": 0, "merge": [0, 8, 6, 4]},
    "zerotprune": {"r": 9},
}
REMOVE_NOTHING = {  # settings that remove nothing: the model must be exactly the unpatched one
    "none": [{}],
    "tome": [{"r": 0}, {"ratio": 1.0}],
    "pitome": [{"r": 0}, {"ratio": 1.0}],
    "tofu": [{"r": 0}, {"ratio": 1.0}],
    "mctf": [{"r": 0}],
    "mstm": [{"ratio": 1.0, "layers": STAGES}],
    "evit": [{"ratio": 1.0, "layers": STAGES}],
    "topk": [{"ratio": 1.0, "layers": STAGES}],
    "norm": [{"ratio": 1.0, "layers": STAGES}],
    "random": [{"ratio": 1.0, "layers": STAGES}],
    "dynamicvit": [{"ratios": [1.0], "layers": [2]}],
    "atc": [{"r": 0}, {"ratio": 1.0}],
    "compose": [{"parts": [{"name": "tome", "layers": [0, 1], "r": 0}, {"name": "atc", "layers": [2], "r": 0}]}],
    "ppt": [{"r": 0, "layers": STAGES}],
    "diffrate": [{"prune": 0, "merge": 0}, {"prune": [0, 0], "merge": [0]}],
    "zerotprune": [{"r": 0}, {"r": 9, "layers": []}],
}
# every reducer but those that plan on a diffusion model's latent grid (tomesd, todo: tests/test_diffusion.py)
# and those that cut visual tokens of a vision-language model, inside its language model (fastv, pyramiddrop,
# dart: tests/test_vlm_language_model.py) or at its vision-language boundary (visionzip, prumerge, prumerge+:
# tests/test_vlm_boundary.py), which every other family refuses
SEQUENCE_REDUCERS = {n for n in tokenreduce.available()
                     if not any(hasattr(tokenreduce.reducer_class(n), a)
                                for a in ("plan_block", "prefill_stages", "boundary_needs"))}
NEEDS_CLASS_TOKEN = {"diffrate", "mstm", "evit", "topk", "ppt"}  # rank tokens by the class token's attention
DROPS_TOKENS = {"topk", "norm", "random", "dynamicvit", "zerotprune"}  # pruning: the dropped patches are gone
PER_SAMPLE_DRAW = {"random"}  # each batch position draws its own subset
# Parameters feeding a zero-initialised projection (identity at start) get a zero gradient at first.
BEHIND_ZERO_INIT = {"mstm": "token_reducer.fusion.norm."}


def cases(exclude=()):
    return [
        pytest.param(name, model, id=f"{name}-{model}")
        for name in SETTINGS if name not in exclude
        for model in TINY_MODELS if name not in NEEDS_CLASS_TOKEN or model == "test_vit"
    ]


def reduced(name, model_name, **extra):
    return tokenreduce.apply(make_model(model_name), name, **SETTINGS[name], **extra)


def test_every_registered_reducer_is_covered():
    assert set(SETTINGS) == set(REMOVE_NOTHING) == SEQUENCE_REDUCERS


@pytest.mark.parametrize("name, model_name", cases())
def test_removing_nothing_is_the_unpatched_model(name, model_name):
    model = make_model(model_name)
    x = images_for(model)
    with torch.no_grad():
        want = model(x)
        for params in REMOVE_NOTHING[name]:
            got = tokenreduce.apply(model, name, **params)(x)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            assert tokenreduce.stats(model)["removed"] == [0] * len(model.blocks)


@pytest.mark.parametrize("name", sorted(NEEDS_CLASS_TOKEN))
def test_class_token_methods_refuse_models_without_one(name):
    model = make_model("test_vit2")  # a register token, no class token
    with pytest.raises(ConfigError, match="class token"):
        tokenreduce.apply(model, name, **SETTINGS[name])
    assert not hasattr(model, "_tokenreduce")


@pytest.mark.parametrize("name, model_name", cases(exclude={"none"}))
def test_the_setting_removes_tokens(name, model_name):
    model = reduced(name, model_name)
    with torch.no_grad():
        model(images_for(model))
    stats = tokenreduce.stats(model)
    assert sum(stats["removed"]) > 0 and stats["tokens"][-1] < stats["tokens"][0]


@pytest.mark.parametrize("name, model_name", cases(exclude={"none"} | DROPS_TOKENS))
def test_sizes_sources_and_prefix_tokens_after_every_merge(name, model_name, monkeypatch):
    """Sizes add up to the input tokens, each input token is in exactly one token, and prefix
    tokens stay first and absorb nothing."""
    counts = check_every_merge(monkeypatch)
    model = reduced(name, model_name, trace_source=True)
    with torch.no_grad():
        model(images_for(model, batch=3))
    assert counts, "no merge was checked"


@pytest.mark.parametrize("name, model_name", cases(exclude=PER_SAMPLE_DRAW))
def test_sample_output_does_not_depend_on_the_batch(name, model_name):
    model = reduced(name, model_name)
    x = images_for(model, batch=4)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, model_name", cases())
def test_gradients_reach_every_parameter(name, model_name):
    model = tokenreduce.apply(make_model(model_name, drop_path_rate=0.1), name, **SETTINGS[name]).train()
    model(images_for(model)).logsumexp(-1).sum().backward()
    zero_ok = BEHIND_ZERO_INIT.get(name, "\0")
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not (p.grad.any() or n.startswith(zero_ok)))]
    assert not missing


@pytest.mark.parametrize("name, model_name", cases(exclude=PER_SAMPLE_DRAW))
def test_bfloat16_runs_with_the_same_token_counts(name, model_name):
    """On random tiny models similarities are nearly tied, so bfloat16 picks other tokens to merge
    than float32 (outputs then differ by the choice, not by precision); the precision of the merge
    itself is checked in test_matching with the selection held fixed."""
    model = reduced(name, model_name)
    check_bfloat16(model, images_for(model))


@pytest.mark.parametrize("name, model_name", cases())
def test_analytic_macs_equal_flop_counter(name, model_name):
    """FlopCounterMode counts 2 FLOPs per multiply-accumulate of every matmul and convolution, with
    attention decomposed into matmuls by the math kernel; `stats` counts the same operations
    (patch embedding, linear layers, q.k^T, attention.v, the reducer's own similarity matrices and
    predictors, pooling attention, head), so the two agree exactly."""
    model = reduced(name, model_name)
    x = images_for(model, batch=2)
    flops = counted_flops(model, x)
    assert tokenreduce.stats(model)["macs"] * 2 * 2 == flops


# torch.compile(fullgraph=True) cannot trace these, and why (docs/benchmarks.md)
NOT_ONE_GRAPH = {"random": "it draws with a torch.Generator of its own, an object torch.compile cannot trace"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SETTINGS if n != "none"])
def test_torch_compile_gives_the_same_output_in_one_graph(name):
    model = reduced(name, "test_vit")
    x = images_for(model)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=name not in NOT_ONE_GRAPH)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name, param, values", [("tome", "ratio", (0.9, 0.93)), ("pitome", "ratio", (0.9, 0.93)),
                                                 ("evit", "ratio", (0.7, 0.8)), ("tome", "r", (4, 6))])
def test_two_models_that_differ_in_a_setting_compile_in_one_process(name, param, values):
    """torch.compile turns a number that differs between two compilations of the same code into a
    symbolic input; the schedule must still resolve to the second model's own counts."""
    torch._dynamo.reset()
    for value in values:
        params = {**SETTINGS.get(name, {}), param: value}
        params.pop("r" if param == "ratio" else "ratio", None)
        model = tokenreduce.apply(make_model("test_vit"), name, **params)
        x = images_for(model)
        with torch.no_grad():
            want = model(x)
            tokens = tokenreduce.stats(model)["tokens"]
            got = torch.compile(model, fullgraph=True)(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert tokenreduce.stats(model)["tokens"] == tokens
