"""The Hugging Face transformers video/audio adapter: VideoMAEModel, VideoMAEForVideoClassification, ASTModel
and ASTForAudioClassification. Exact when nothing is removed, for both attention implementations; `remove`;
token counts; every reducer the model allows (class-token reducers refused on VideoMAE); ToMe against a
plain loop; gradients; MACs equal FlopCounterMode; refusals (masked pre-training, attention masks)."""

import inspect

import pytest
import torch
from hf_checks import check_flash_attention_refused, check_missing_transformers_refused
from reduction_checks import parameters_without_gradient
from test_hf_adapter import _brute_force_groups, _flop_counter_macs
from test_invariants import NEEDS_CLASS_TOKEN, SEQUENCE_REDUCERS
from test_invariants import SETTINGS as INVARIANT_SETTINGS

import tokenreduce
from tokenreduce.adapters import adapter_for, hf_media
from tokenreduce.errors import ConfigError, UnsupportedModelError

transformers = pytest.importorskip("transformers")

SETTINGS = INVARIANT_SETTINGS  # layers 1 and 3 exist: the tiny models have 4 layers
IMPLS = ("eager", "sdpa")
SHAPE = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64}
VIDEO = {"image_size": 32, "patch_size": 8, "num_frames": 4, "tubelet_size": 2}  # 2 x 4 x 4 = 32 tubelets
AUDIO = {"num_mel_bins": 24, "max_length": 24, "patch_size": 4, "frequency_stride": 4, "time_stride": 4}  # 6 x 6
CONFIGS = {  # class -> (config, prefix tokens); the classifiers have 5 labels
    "VideoMAEModel": (lambda **kw: transformers.VideoMAEConfig(**SHAPE, **VIDEO, num_labels=5, **kw), 0),
    "VideoMAEForVideoClassification": (lambda **kw: transformers.VideoMAEConfig(**SHAPE, **VIDEO, num_labels=5, **kw), 0),
    "ASTModel": (lambda **kw: transformers.ASTConfig(**SHAPE, **AUDIO, num_labels=5, **kw), 2),
    "ASTForAudioClassification": (lambda **kw: transformers.ASTConfig(**SHAPE, **AUDIO, num_labels=5, **kw), 2),
}
CLASSIFIERS = ("VideoMAEForVideoClassification", "ASTForAudioClassification")
OUTPUTS = ("logits", "last_hidden_state", "pooler_output", "loss")


def make(name: str, attn: str = "eager", **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, name)(CONFIGS[name][0](attn_implementation=attn, **config)).eval()


def inputs(name: str, batch=2, seed=0) -> torch.Tensor:
    """A clip [B, 4 frames, 3, 32, 32] or a spectrogram [B, 24 time frames, 24 mel bins]."""
    shape = (batch, 4, 3, 32, 32) if name.startswith("VideoMAE") else (batch, 24, 24)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def prefix(name: str) -> int:
    return CONFIGS[name][1]


def patches(name: str) -> int:
    """32 tubelets (2 x 4 x 4) or 36 spectrogram patches (6 x 6: square, as MSTM's fusion wants)."""
    return 32 if name.startswith("VideoMAE") else 36


def outputs_of(out) -> dict:
    return {k: out[k] for k in OUTPUTS if k in out and out[k] is not None}


def head_output(out) -> torch.Tensor:
    """What a model ends in: the logits, the pooled output, or the mean of the last hidden state."""
    for key in ("logits", "pooler_output"):
        if key in out and out[key] is not None:
            return out[key]
    return out["last_hidden_state"].mean(1)


def test_every_supported_class_is_tested():
    assert set(CONFIGS) == set(hf_media.SUPPORTED)
    assert set(SETTINGS) == SEQUENCE_REDUCERS


# --- exact when nothing is removed ----------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CONFIGS)
def test_zero_reduction_and_remove_are_the_unpatched_model(name, attn):
    model = make(name, attn)
    original, signature = type(model), inspect.signature(model.forward)
    x = inputs(name)
    with torch.no_grad():
        want = outputs_of(model(x))
        assert want
        for reducer, params in [("tome", {"r": 0}), ("none", {})]:
            tokenreduce.apply(model, reducer, **params)
            assert adapter_for(model).name == "hf_media"
            assert inspect.signature(model.forward) == signature
            got = outputs_of(model(x))
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
            assert tokenreduce.stats(model)["removed"] == [0] * 4
        tokenreduce.remove(model)
        restored = outputs_of(model(x))
    assert type(model) is original and model.forward.__func__ is original.forward
    assert not hasattr(model, "token_reducer") and not hasattr(model, "_tokenreduce")
    for key in want:
        torch.testing.assert_close(restored[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_labels_and_tuples_are_passed_on(name):
    model = make(name)
    x, labels = inputs(name), torch.tensor([1, 3])
    with torch.no_grad():
        want = model(x, labels=labels)
        want_tuple = model(x, labels, return_dict=False)
        tokenreduce.apply(model, "tome", r=0)
        got = model(x, labels=labels)
        got_tuple = model(x, labels, return_dict=False)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    assert isinstance(got_tuple, tuple) and len(got_tuple) == len(want_tuple) == 2
    torch.testing.assert_close(got_tuple[1], want_tuple[1], rtol=0, atol=0)


# --- token counts, every reducer ---------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_token_counts_follow_the_schedule(name):
    model = tokenreduce.apply(make(name), "tome", r=10)  # capped at half the patches
    with torch.no_grad():
        model(inputs(name))
    stats = tokenreduce.stats(model)
    schedule = {32: ([10, 10, 6, 3], (32, 22, 12, 6, 3)), 36: ([10, 10, 8, 4], (36, 26, 16, 8, 4))}[patches(name)]
    assert model.token_reducer.removal_counts(4, patches(name)) == schedule[0] == stats["removed"]
    assert stats["tokens"] == [prefix(name) + n for n in schedule[1]]
    assert model._tokenreduce.info.num_prefix == prefix(name)
    assert model._tokenreduce.info.has_class_token == (prefix(name) > 0)


@pytest.mark.parametrize("reducer", sorted(SETTINGS))
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_reducer_the_model_allows_runs(name, reducer):
    model = make(name, "sdpa")
    if prefix(name) == 0 and reducer in NEEDS_CLASS_TOKEN:
        with pytest.raises(ConfigError, match="class token"):
            tokenreduce.apply(model, reducer, **SETTINGS[reducer])
        assert not hasattr(model, "_tokenreduce")
        return
    tokenreduce.apply(model, reducer, **SETTINGS[reducer])
    with torch.no_grad():
        out = model(inputs(name))
    stats = tokenreduce.stats(model)
    assert torch.isfinite(out.logits).all() and out.logits.shape == (2, 5)
    assert reducer == "none" or sum(stats["removed"]) > 0
    assert stats["tokens"][0] == patches(name) + prefix(name)


@pytest.mark.parametrize("attn", IMPLS)
def test_video_mean_is_weighted_by_size(attn):
    """VideoMAE's classifier averages the tokens: a merged token counts as the tubelets it stands for."""
    model = tokenreduce.apply(make("VideoMAEForVideoClassification", attn), "tome", r=8)
    seen = {}
    model.videomae.encoder.layer[-1].output.register_forward_hook(lambda m, a, out: seen.setdefault("tokens", out))
    model.fc_norm.register_forward_hook(lambda m, a, out: seen.setdefault("mean", a[0]))
    with torch.no_grad():
        model(inputs("VideoMAEForVideoClassification"))
    sizes = model._tokenreduce.last_state.sizes
    assert sizes is not None and sizes.sum(1).eq(32).all() and sizes.max() > 1
    assert model.videomae.layernorm is None  # use_mean_pooling: no layernorm before the mean
    tokens = seen["tokens"]
    assert tokens.shape[1] == 4
    torch.testing.assert_close(seen["mean"], (tokens * sizes).sum(1) / sizes.sum(1), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(seen["mean"], tokens.mean(1))


def test_ast_pooled_output_is_its_two_prefix_tokens():
    model = tokenreduce.apply(make("ASTModel", "sdpa"), "tome", r=8)
    with torch.no_grad():
        out = model(inputs("ASTModel"))
    assert tokenreduce.stats(model)["tokens"] == [2 + n for n in (36, 28, 20, 12, 6)]
    seq = out.last_hidden_state
    torch.testing.assert_close(out.pooler_output, (seq[:, 0] + seq[:, 1]) / 2, rtol=0, atol=0)


@pytest.mark.parametrize("name, reducer", [(n, r) for n in CLASSIFIERS for r in ("tome", "mctf", "dynamicvit", "evit")
                                           if prefix(n) or r not in NEEDS_CLASS_TOKEN])
def test_gradients_reach_every_parameter(name, reducer):
    model = tokenreduce.apply(make(name), reducer, **SETTINGS[reducer]).train()

    class Logits(torch.nn.Module):  # parameters_without_gradient calls model(x) and wants a tensor
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x).logits

    assert parameters_without_gradient(Logits(), inputs(name)) == []


def test_transformers_checkpointing_gives_the_same_gradients():
    import copy

    model = tokenreduce.apply(make("VideoMAEForVideoClassification"), "tome", r=6).train()
    twin = copy.deepcopy(model)
    enable = getattr(twin, "activation_checkpointing_enable", None) or twin.gradient_checkpointing_enable
    enable()
    assert twin.videomae.encoder.layer[0].gradient_checkpointing
    for m in (model, twin):
        m(inputs("VideoMAEForVideoClassification")).logits.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- ToMe as a plain loop ------------------------------------------------------------------------------
def _reference_tome(model, x, r: int, layers=(0, 1, 2, 3)) -> torch.Tensor:
    """ToMe by hand through VideoMAEForVideoClassification: tubelet embeddings with their fixed positions,
    then per layer the attention (query/key/value, dense) with the log-size bias, matching on the keys
    averaged over heads, size-weighted merge after the attention residual (in `layers`), then the MLP; the size-weighted
    mean of the tokens through fc_norm and the classifier."""
    base = model.videomae
    tokens = base.embeddings(x, None)
    outputs = []
    for b in range(x.shape[0]):
        t, sizes = tokens[b], torch.ones(tokens.shape[1])
        for i, layer in enumerate(base.encoder.layer):
            attn = layer.attention.attention
            h = layer.layernorm_before(t)
            q, k, v = (p(h).view(len(h), attn.num_attention_heads, -1).transpose(0, 1)
                       for p in (attn.query, attn.key, attn.value))
            probs = (q @ k.transpose(1, 2) * attn.scaling + sizes.log()).softmax(-1)
            t = t + layer.attention.output.dense((probs @ v).transpose(0, 1).reshape(len(h), -1))
            groups = _brute_force_groups(k.mean(0), r if i in layers else 0, 0)
            t = torch.stack([(t[g] * sizes[g, None]).sum(0) / sizes[g].sum() for g in groups])
            sizes = torch.stack([sizes[g].sum() for g in groups])
            t = t + layer.output.dense(layer.intermediate(layer.layernorm_after(t)))
        mean = (t * sizes[:, None]).sum(0) / sizes.sum()
        outputs.append(model.classifier(model.fc_norm(mean)))
    return torch.stack(outputs)


@pytest.mark.parametrize("attn", IMPLS)
def test_tome_equals_a_plain_loop(attn):
    model = make("VideoMAEForVideoClassification", attn)
    x = inputs("VideoMAEForVideoClassification")
    with torch.no_grad():
        want = _reference_tome(model, x, r=6)
        got = tokenreduce.apply(model, "tome", r=6)(x).logits
    assert tokenreduce.stats(model)["tokens"] == [32, 26, 20, 14, 8]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", IMPLS)
def test_layers_after_a_merge_see_the_sizes(attn):
    """VideoMAE's layers take no attention mask: a layer that does not reduce, after one that merged,
    still attends with the log-size bias."""
    model = make("VideoMAEForVideoClassification", attn)
    x = inputs("VideoMAEForVideoClassification")
    with torch.no_grad():
        want = _reference_tome(model, x, r=8, layers=(0,))
        got = tokenreduce.apply(model, "tome", r=8, layers=[0])(x).logits
    assert tokenreduce.stats(model)["tokens"] == [32, 24, 24, 24, 24]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- cost ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CONFIGS)
def test_analytic_macs_equal_flop_counter(name, attn):
    model = make(name, attn)
    for reducer, params in [("none", {}), ("tome", {"r": 6}), ("mctf", SETTINGS["mctf"])]:
        tokenreduce.apply(model, reducer, **params)
        stats_macs, counted = _flop_counter_macs(model, inputs(name))
        assert stats_macs == counted, reducer


# --- refusals ----------------------------------------------------------------------------------------
def _counting(model, embeddings):
    calls = []
    embeddings.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("name", ["VideoMAEModel", "VideoMAEForVideoClassification"])
def test_masked_pretraining_input_is_refused_before_any_compute(name):
    model = tokenreduce.apply(make(name), "tome", r=4)
    calls = _counting(model, (model if name == "VideoMAEModel" else model.videomae).embeddings)
    with pytest.raises(ConfigError, match="bool_masked_pos is not supported.*masked pre-training"):
        model(inputs(name), bool_masked_pos=torch.zeros(2, 32, dtype=torch.bool))
    assert not calls


def test_masked_pretraining_model_is_refused_with_the_reason():
    model = transformers.VideoMAEForPreTraining(CONFIGS["VideoMAEModel"][0]())
    with pytest.raises(ConfigError, match="masked pre-training") as err:
        tokenreduce.apply(model, "tome", r=2)
    assert all(n in str(err.value) for n in hf_media.SUPPORTED)
    assert not hasattr(model, "_tokenreduce")


def test_video_classifier_of_the_first_token_is_refused():
    model = make("VideoMAEForVideoClassification", use_mean_pooling=False)
    with pytest.raises(UnsupportedModelError, match="use_mean_pooling=False"):
        tokenreduce.apply(model, "tome", r=2)
    assert not hasattr(model, "_tokenreduce")


@pytest.mark.parametrize("kwargs, words", [
    ({"output_attentions": True}, "output_attentions=True is not supported"),
    ({"output_hidden_states": True}, "output_hidden_states=True is not supported"),
    ({"attention_mask": torch.ones(2, 38)}, "attention_mask is not supported"),
])
def test_refused_ast_arguments_are_named_before_any_compute(kwargs, words):
    model = tokenreduce.apply(make("ASTForAudioClassification"), "tome", r=4)
    calls = _counting(model, model.audio_spectrogram_transformer.embeddings)
    with pytest.raises(ConfigError, match=words):
        model(inputs("ASTForAudioClassification"), **kwargs)
    assert not calls


def test_an_attention_implementation_without_a_float_mask_is_refused():
    check_flash_attention_refused(make("ASTModel"))


def test_missing_transformers_says_how_to_install_it(monkeypatch):
    check_missing_transformers_refused(make("VideoMAEModel"), hf_media.MODULES, monkeypatch)
