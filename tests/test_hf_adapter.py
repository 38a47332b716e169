"""The Hugging Face transformers adapter (ViT, DeiT, DINOv2, DINOv2 with registers): exact when nothing
is removed, for both attention implementations; every reducer; ToMe against a plain loop; MACs equal
FlopCounterMode; refusals before any compute; transformers imported only when a model needs it."""

import inspect
import sys

import pytest
import torch
from conftest import counted_flops
from hf_checks import check_flash_attention_refused, check_missing_transformers_refused
from reduction_checks import parameters_without_gradient
from test_invariants import NEEDS_CLASS_TOKEN, SEQUENCE_REDUCERS
from test_invariants import SETTINGS as INVARIANT_SETTINGS

import tokenreduce
from tokenreduce.adapters import adapter_for, adapters, hf_vit
from tokenreduce.errors import ConfigError, UnsupportedModelError
from tokenreduce.reducers.base import reducer_class

transformers = pytest.importorskip("transformers")

SETTINGS = INVARIANT_SETTINGS  # layers 1 and 3 exist: the tiny models have 4 layers
IMPLS = ("eager", "sdpa")
SHAPE = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 32, "patch_size": 4}
CONFIGS = {  # 8x8 patches; the classifiers have 5 labels
    "vit": lambda **kw: transformers.ViTConfig(**SHAPE, intermediate_size=64, num_labels=5, **kw),
    "deit": lambda **kw: transformers.DeiTConfig(**SHAPE, intermediate_size=64, num_labels=5, **kw),
    "dinov2": lambda **kw: transformers.Dinov2Config(**SHAPE, mlp_ratio=2, num_labels=5, **kw),
    "dinov2_reg": lambda **kw: transformers.Dinov2WithRegistersConfig(**SHAPE, mlp_ratio=2, num_labels=5,
                                                                       num_register_tokens=2, **kw),
}
CLASSES = {  # class -> (config, prefix tokens)
    "ViTModel": ("vit", 1),
    "ViTForImageClassification": ("vit", 1),
    "DeiTModel": ("deit", 2),
    "DeiTForImageClassification": ("deit", 2),
    "DeiTForImageClassificationWithTeacher": ("deit", 2),
    "Dinov2Model": ("dinov2", 1),
    "Dinov2ForImageClassification": ("dinov2", 1),
    "Dinov2WithRegistersModel": ("dinov2_reg", 3),
    "Dinov2WithRegistersForImageClassification": ("dinov2_reg", 3),
}
# one model per family, each with a classifier (gradients reach every parameter through its logits)
HEADS = ("ViTForImageClassification", "DeiTForImageClassificationWithTeacher", "Dinov2ForImageClassification",
         "Dinov2WithRegistersForImageClassification")
OUTPUTS = ("logits", "cls_logits", "distillation_logits", "last_hidden_state", "pooler_output")


def make(name: str, attn: str = "eager", **config) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[CLASSES[name][0]](attn_implementation=attn, **config)
    return getattr(transformers, name)(cfg).eval()


def images(batch=2, seed=0, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outputs_of(out) -> dict:
    return {k: out[k] for k in OUTPUTS if k in out and out[k] is not None}


def assert_outputs_equal(got, want, atol=0.0):
    got, want = outputs_of(got), outputs_of(want)
    assert got.keys() == want.keys() and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=key)


def test_every_supported_class_is_tested():
    assert set(CLASSES) == set(hf_vit.SUPPORTED)
    assert set(SETTINGS) == SEQUENCE_REDUCERS


# --- exact when nothing is removed ----------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CLASSES)
def test_zero_reduction_and_remove_are_the_unpatched_model(name, attn):
    model = make(name, attn)
    original, signature = type(model), inspect.signature(model.forward)
    x = images()
    with torch.no_grad():
        want = model(x)
        for reducer, params in [("tome", {"r": 0}), ("none", {}), ("pitome", {"ratio": 1.0})]:
            tokenreduce.apply(model, reducer, **params)
            assert inspect.signature(model.forward) == signature
            got = model(x)
            assert type(got) is type(want)
            assert_outputs_equal(got, want, atol=1e-6)
            assert tokenreduce.stats(model)["removed"] == [0] * 4
        tokenreduce.remove(model)
        restored = model(x)
    assert type(model) is original and model.forward.__func__ is original.forward
    assert not hasattr(model, "token_reducer") and not hasattr(model, "_tokenreduce")
    assert_outputs_equal(restored, want)


def test_keyword_and_positional_arguments_labels_and_tuples():
    model = make("ViTForImageClassification")
    x, labels = images(), torch.tensor([1, 3])
    with torch.no_grad():
        want = model(x, labels=labels)
        want_tuple = model(x, labels, return_dict=False)
        tokenreduce.apply(model, "tome", r=0)
        got = model(pixel_values=x, labels=labels)
        got_tuple = model(x, labels, return_dict=False)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-6)
    assert isinstance(got_tuple, tuple) and len(got_tuple) == len(want_tuple) == 2
    torch.testing.assert_close(got_tuple[1], want_tuple[1], rtol=0, atol=1e-6)


def test_interpolated_positions_and_masked_patches_are_passed_on():
    torch.manual_seed(0)  # ViTModel takes use_mask_token in __init__
    model = transformers.ViTModel(CONFIGS["vit"](), use_mask_token=True).eval()
    x, masked = images(size=48), torch.rand(2, 64) > 0.5
    with torch.no_grad():
        want = model(x, interpolate_pos_encoding=True)
        want_masked = model(images(), bool_masked_pos=masked)
        tokenreduce.apply(model, "tome", r=0)
        assert_outputs_equal(model(x, interpolate_pos_encoding=True), want, atol=1e-6)
        assert_outputs_equal(model(images(), bool_masked_pos=masked), want_masked, atol=1e-6)
        tokenreduce.apply(model, "tome", r=16)
        model(x, interpolate_pos_encoding=True)  # 12 x 12 patches
    assert tokenreduce.stats(model)["tokens"] == [145, 129, 113, 97, 81]


# --- token counts, every reducer ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ViTForImageClassification", "DeiTModel", "Dinov2WithRegistersModel"])
def test_token_counts_follow_the_schedule(name):
    model = tokenreduce.apply(make(name), "tome", r=20)  # capped at half the patches
    with torch.no_grad():
        model(images())
    prefix = CLASSES[name][1]
    stats = tokenreduce.stats(model)
    assert model.token_reducer.removal_counts(4, 64) == [20, 20, 12, 6] == stats["removed"]
    assert stats["tokens"] == [prefix + n for n in (64, 44, 24, 12, 6)]
    assert tokenreduce.reducer_of(model).name == "tome" and model._tokenreduce.info.num_prefix == prefix


@pytest.mark.parametrize("reducer", sorted(SETTINGS))
@pytest.mark.parametrize("name", HEADS)
def test_every_reducer_runs(name, reducer):
    """Every supported class has a class token, so the reducers that need one run too."""
    assert adapter_for(make(name)).describe(make(name)).has_class_token
    model = tokenreduce.apply(make(name, "sdpa"), reducer, **SETTINGS[reducer])
    with torch.no_grad():
        out = model(images())
    stats = tokenreduce.stats(model)
    assert torch.isfinite(out.logits).all() and out.logits.shape == (2, 5)
    assert reducer == "none" or sum(stats["removed"]) > 0
    assert stats["tokens"][0] == 64 + CLASSES[name][1]


def test_class_token_reducers_are_checked_against_the_model():
    info = hf_vit.describe(make("Dinov2WithRegistersModel"))
    assert info.has_class_token and info.num_prefix == 3 and info.depth == 4
    for reducer in sorted(NEEDS_CLASS_TOKEN):  # they would refuse a model without one
        reducer_class(reducer)(**SETTINGS[reducer]).check_model(info)


@pytest.mark.parametrize("reducer", [n for n in SETTINGS if n != "random"])
def test_sample_output_does_not_depend_on_the_batch(reducer):
    model = tokenreduce.apply(make("Dinov2WithRegistersForImageClassification"), reducer, **SETTINGS[reducer])
    x = images(batch=4)
    with torch.no_grad():
        together = model(x).logits
        alone = torch.cat([model(x[i : i + 1]).logits for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reducer", ["tome", "mctf", "evit", "dynamicvit"])
@pytest.mark.parametrize("name", HEADS)
def test_gradients_reach_every_parameter(name, reducer):
    extra = {"drop_path_rate": 0.1} if name.startswith("Dinov2") else {"hidden_dropout_prob": 0.1}
    model = tokenreduce.apply(make(name, **extra), reducer, **SETTINGS[reducer]).train()

    class Logits(torch.nn.Module):  # parameters_without_gradient calls model(x) and wants a tensor
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x).logits

    missing = parameters_without_gradient(Logits(), images())
    assert [n for n in missing if not n.endswith("mask_token")] == []  # the mask token serves bool_masked_pos


@pytest.mark.parametrize("reducer", ["tome", "mctf"])
def test_transformers_checkpointing_gives_the_same_gradients(reducer):
    import copy

    model = tokenreduce.apply(make("Dinov2ForImageClassification"), reducer, **SETTINGS[reducer]).train()
    twin = copy.deepcopy(model)
    enable = getattr(twin, "activation_checkpointing_enable", None) or twin.gradient_checkpointing_enable
    enable()
    assert twin.base_model.encoder.layer[0].gradient_checkpointing
    for m in (model, twin):
        m(images()).logits.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- ToMe as a plain loop ------------------------------------------------------------------------------
def _brute_force_groups(keys: torch.Tensor, r: int, num_prefix: int) -> list[list[int]]:
    """ToMe's bipartite matching of one image by loops: of the non-prefix tokens, A holds those at even
    positions and B those at odd ones; each A token finds its most similar B token (cosine, the first on
    a tie); the r A tokens with the highest such similarity merge into theirs (the earlier on a tie).
    Returns the tokens of each output token: prefix tokens, kept A tokens, then B tokens, the token
    that is kept first in each group."""
    n = keys.shape[0]
    unit = [keys[i] / keys[i].norm() for i in range(n)]
    a_idx = [i for i in range(num_prefix, n) if i % 2 == 0]
    b_idx = [i for i in range(num_prefix, n) if i % 2 == 1]
    best = []
    for i in a_idx:
        scores = [float(unit[i] @ unit[j]) for j in b_idx]
        top = max(range(len(b_idx)), key=lambda j: (scores[j], -j))
        best.append((scores[top], top))
    order = sorted(range(len(a_idx)), key=lambda a: (-best[a][0], a))
    merged = set(order[:r])
    groups = [[p] for p in range(num_prefix)] + [[a_idx[a]] for a in range(len(a_idx)) if a not in merged]
    b_groups = [[j] for j in b_idx]
    for a in order[:r]:
        b_groups[best[a][1]].append(a_idx[a])
    return groups + b_groups


def _reference_tome(model, x, r: int):
    """ToMe by hand through a transformers classifier: attention with the log-size bias, matching on the
    keys averaged over heads, size-weighted merge after the attention residual, then the MLP; the head
    pools the class token (ViT) or the class token and the size-weighted patch mean (DINOv2)."""
    encoder = model.base_model
    dinov2 = hasattr(encoder, "encoder")
    layers = encoder.encoder.layer if dinov2 else encoder.layers
    prefix = hf_vit._num_prefix(encoder)
    tokens = encoder.embeddings(x)
    outputs = []
    for b in range(x.shape[0]):
        t, sizes = tokens[b], torch.ones(tokens.shape[1])
        for layer in layers:
            attn = layer.attention
            h = layer.norm1(t) if dinov2 else layer.layernorm_before(t)
            q, k, v = (p(h).view(len(h), attn.num_attention_heads, -1).transpose(0, 1)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            probs = (q @ k.transpose(1, 2) * attn.scaling + sizes.log()).softmax(-1)
            y = attn.o_proj((probs @ v).transpose(0, 1).reshape(len(h), -1))
            t = t + (layer.layer_scale1(y) if dinov2 else y)
            groups = _brute_force_groups(k.mean(0), r, prefix)
            t = torch.stack([(t[g] * sizes[g, None]).sum(0) / sizes[g].sum() for g in groups])
            sizes = torch.stack([sizes[g].sum() for g in groups])
            if dinov2:
                t = t + layer.layer_scale2(layer.mlp(layer.norm2(t)))
            else:
                t = t + layer.mlp(layer.layernorm_after(t))
        t = encoder.layernorm(t)
        if dinov2:
            mean = (t[prefix:] * sizes[prefix:, None]).sum(0) / sizes[prefix:].sum()
            outputs.append(model.classifier(torch.cat([t[0], mean])))
        else:
            outputs.append(model.classifier(t[0]))
    return torch.stack(outputs)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2WithRegistersForImageClassification"])
def test_tome_equals_a_plain_loop(name, attn):
    model = make(name, attn)
    x = images()
    with torch.no_grad():
        want = _reference_tome(model, x, r=8)
        got = tokenreduce.apply(model, "tome", r=8)(x).logits
    prefix = CLASSES[name][1]
    assert tokenreduce.stats(model)["tokens"] == [prefix + n for n in (64, 56, 48, 40, 32)]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- cost ---------------------------------------------------------------------------------------------
def _flop_counter_macs(model, x) -> tuple[int, int]:
    flops = counted_flops(model, x)
    return tokenreduce.stats(model)["macs"], flops // 2 // 2  # per image, per MAC


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CLASSES)
def test_analytic_macs_equal_flop_counter(name, attn):
    model = make(name, attn)
    for reducer, params in [("none", {}), ("tome", {"r": 8})]:
        tokenreduce.apply(model, reducer, **params)
        stats_macs, counted = _flop_counter_macs(model, images())
        assert stats_macs == counted, reducer


@pytest.mark.parametrize("reducer", ["mctf", "evit", "dynamicvit", "pitome", "diffrate"])
def test_analytic_macs_equal_flop_counter_for_reducers_of_their_own_cost(reducer):
    model = tokenreduce.apply(make("Dinov2WithRegistersForImageClassification", "sdpa"), reducer, **SETTINGS[reducer])
    stats_macs, counted = _flop_counter_macs(model, images())
    assert stats_macs == counted


# --- refusals ----------------------------------------------------------------------------------------
def _counting(model):
    calls = []
    model.base_model.embeddings.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("kwargs, words", [
    ({"attention_mask": torch.ones(2, 65)}, "attention_mask is not supported"),
    ({"output_attentions": True}, "output_attentions=True is not supported"),
    ({"output_hidden_states": True}, "output_hidden_states=True is not supported"),
    ({"head_mask": torch.ones(4, 4)}, "head_mask not supported"),
])
def test_refused_arguments_are_named_before_any_compute(kwargs, words):
    model = tokenreduce.apply(make("ViTForImageClassification"), "tome", r=4)
    calls = _counting(model)
    with pytest.raises(ConfigError, match=words):
        model(images(), **kwargs)
    assert not calls


def test_output_flags_in_the_config_are_refused_too():
    model = tokenreduce.apply(make("Dinov2Model", output_hidden_states=True), "tome", r=4)
    with pytest.raises(ConfigError, match="output_hidden_states=True"):
        model(images())


def test_an_unsupported_transformers_class_names_itself_and_the_supported_ones():
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50))
    with pytest.raises(ConfigError) as err:
        tokenreduce.apply(model, "tome", r=2)
    message = str(err.value)
    assert "GPT2Model" in message and all(name in message for name in hf_vit.SUPPORTED)
    assert not hasattr(model, "_tokenreduce")
    with pytest.raises(UnsupportedModelError, match="GPT2Model is not a supported"):
        hf_vit.describe(model)


def test_an_attention_implementation_without_a_float_mask_is_refused():
    check_flash_attention_refused(make("ViTModel"))


def test_missing_transformers_says_how_to_install_it(monkeypatch):
    check_missing_transformers_refused(make("ViTForImageClassification"), hf_vit.MODULES, monkeypatch)


def test_the_adapter_works_without_transformers_and_imports_it_only_for_its_models(monkeypatch):
    """The module loads, and every other family is claimed and reduced, with transformers not importable
    (every transformers module hidden; the running registry gets the freshly loaded adapter)."""
    import importlib.util

    import timm

    from tokenreduce.adapters import base

    monkeypatch.setattr(base, "_ADAPTERS", {k: v for k, v in base._ADAPTERS.items() if k != "hf_vit"})
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now fails
    spec = importlib.util.spec_from_file_location("hf_vit_without_transformers", hf_vit.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    fresh = adapters()["hf_vit"]
    assert fresh is not hf_vit.HFViTAdapter and not fresh.claims(torch.nn.Linear(2, 2))
    vit = timm.create_model("test_vit", pretrained=False).eval()
    assert not fresh.claims(vit) and adapter_for(vit) is adapters()["timm_vit"]
    with torch.no_grad():
        tokenreduce.apply(vit, "tome", r=2)(torch.randn(1, *vit.pretrained_cfg["input_size"]))
    assert tokenreduce.stats(vit)["removed"][0] == 2
