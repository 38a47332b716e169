"""The Hugging Face transformers CLIP/SigLIP adapter: the image towers of CLIPVisionModel,
CLIPVisionModelWithProjection, SiglipVisionModel, CLIPModel and SiglipModel (the text towers are the text
adapter's: tests/test_hf_clip_text.py).
Exact when nothing is removed, for both attention implementations; `remove`; token counts; every
reducer the model allows; ToMe against a plain loop; gradients; MACs equal FlopCounterMode."""

import inspect

import pytest
import torch
from hf_checks import check_flash_attention_refused, check_missing_transformers_refused
from reduction_checks import parameters_without_gradient
from test_hf_adapter import _brute_force_groups, _flop_counter_macs
from test_invariants import NEEDS_CLASS_TOKEN, SEQUENCE_REDUCERS
from test_invariants import SETTINGS as INVARIANT_SETTINGS

import tokenreduce
from tokenreduce.adapters import adapter_for, hf_clip
from tokenreduce.errors import ConfigError

transformers = pytest.importorskip("transformers")

SETTINGS = INVARIANT_SETTINGS  # layers 1 and 3 exist: the tiny vision towers have 4 layers
IMPLS = ("eager", "sdpa")
VISION = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64,
          "image_size": 32, "patch_size": 4}  # 8x8 patches
TEXT = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CONFIGS = {
    "CLIPVisionModel": lambda **kw: transformers.CLIPVisionConfig(**VISION, projection_dim=16, **kw),
    "CLIPVisionModelWithProjection": lambda **kw: transformers.CLIPVisionConfig(**VISION, projection_dim=16, **kw),
    "CLIPModel": lambda **kw: transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16, **kw),
    "SiglipVisionModel": lambda **kw: transformers.SiglipVisionConfig(**VISION, **kw),
    "SiglipModel": lambda **kw: transformers.SiglipConfig(text_config=TEXT, vision_config=VISION, **kw),
}
PREFIX = {"CLIPVisionModel": 1, "CLIPVisionModelWithProjection": 1, "CLIPModel": 1, "SiglipVisionModel": 0,
          "SiglipModel": 0}
VISION_MODELS = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel")
DUAL = ("CLIPModel", "SiglipModel")
OUTPUTS = ("pooler_output", "image_embeds", "last_hidden_state", "logits_per_image", "logits_per_text")


def make(name: str, attn: str = "eager", **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, name)(CONFIGS[name](attn_implementation=attn, **config)).eval()


def images(batch=2, seed=0, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text(batch=3, seed=1):
    return torch.randint(3, 99, (batch, 7), generator=torch.Generator().manual_seed(seed))


def run(model, x, ids=None):
    if type(model).__name__.endswith(DUAL):
        return model(input_ids=text() if ids is None else ids, pixel_values=x)
    return model(x)


def outputs_of(out) -> dict:
    return {k: out[k] for k in OUTPUTS if k in out and out[k] is not None}


def pooled(out) -> torch.Tensor:
    """The image's pooled output: image_embeds (projection and dual models) or pooler_output."""
    return out["image_embeds"] if "image_embeds" in out else out["pooler_output"]


def test_every_supported_class_is_tested():
    assert set(CONFIGS) == set(hf_clip.SUPPORTED)
    assert set(SETTINGS) == SEQUENCE_REDUCERS


# --- exact when nothing is removed ----------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CONFIGS)
def test_zero_reduction_and_remove_are_the_unpatched_model(name, attn):
    model = make(name, attn)
    original, signature = type(model), inspect.signature(model.forward)
    tower = model if name.endswith("VisionModel") else model.vision_model
    tower_class, tower_signature = type(tower), inspect.signature(tower.forward)
    x = images()
    with torch.no_grad():
        want = outputs_of(run(model, x))
        assert want
        for reducer, params in [("tome", {"r": 0}), ("none", {})]:
            tokenreduce.apply(model, reducer, **params)
            assert adapter_for(model).name == "hf_clip"
            assert inspect.signature(model.forward) == signature
            assert inspect.signature(tower.forward) == tower_signature
            got = outputs_of(run(model, x))
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
            assert tokenreduce.stats(model)["removed"] == [0] * 4
        tokenreduce.remove(model)
        restored = outputs_of(run(model, x))
    assert type(model) is original and model.forward.__func__ is original.forward
    assert type(tower) is tower_class and "_tr_link" not in tower.__dict__
    assert not hasattr(model, "token_reducer") and not hasattr(model, "_tokenreduce")
    for key in want:
        torch.testing.assert_close(restored[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", DUAL)
def test_dual_encoders_reduce_the_image_tower_only(name):
    model = make(name, "sdpa")
    x, ids = images(), text()
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=x)
        want_text = model.get_text_features(input_ids=ids).pooler_output
        tokenreduce.apply(model, "tome", r=8)
        got = model(input_ids=ids, pixel_values=x)
        features = model.get_image_features(pixel_values=x).pooler_output
        got_text = model.get_text_features(input_ids=ids).pooler_output
    assert tokenreduce.stats(model)["tokens"] == [PREFIX[name] + n for n in (64, 56, 48, 40, 32)]
    assert got.logits_per_image.shape == (2, 3) and got.logits_per_text.shape == (3, 2)
    torch.testing.assert_close(got.text_embeds, want.text_embeds, rtol=0, atol=0)  # the text tower is unreduced
    torch.testing.assert_close(got_text, want_text, rtol=0, atol=0)
    torch.testing.assert_close(features / features.norm(dim=-1, keepdim=True), got.image_embeds)
    assert not torch.allclose(got.image_embeds, want.image_embeds)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in make(name).parameters())
    assert set(model.state_dict()) == set(make(name).state_dict())


def test_tuples_and_interpolated_positions_are_passed_on():
    model = make("CLIPVisionModelWithProjection")
    big = images(size=48)
    with torch.no_grad():
        want = model(big, interpolate_pos_encoding=True)
        want_tuple = model(images(), return_dict=False)
        tokenreduce.apply(model, "tome", r=0)
        torch.testing.assert_close(model(big, interpolate_pos_encoding=True).image_embeds, want.image_embeds,
                                   rtol=0, atol=0)
        got_tuple = model(images(), return_dict=False)
        tokenreduce.apply(model, "tome", r=16)
        model(big, interpolate_pos_encoding=True)  # 12 x 12 patches
    assert isinstance(got_tuple, tuple) and len(got_tuple) == len(want_tuple)
    torch.testing.assert_close(got_tuple[0], want_tuple[0], rtol=0, atol=0)
    assert tokenreduce.stats(model)["tokens"] == [145, 129, 113, 97, 81]


# --- token counts, every reducer ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["CLIPVisionModelWithProjection", "SiglipVisionModel", "CLIPModel"])
def test_token_counts_follow_the_schedule(name):
    model = tokenreduce.apply(make(name), "tome", r=20)  # capped at half the patches
    with torch.no_grad():
        run(model, images())
    stats = tokenreduce.stats(model)
    assert model.token_reducer.removal_counts(4, 64) == [20, 20, 12, 6] == stats["removed"]
    assert stats["tokens"] == [PREFIX[name] + n for n in (64, 44, 24, 12, 6)]
    assert model._tokenreduce.info.num_prefix == PREFIX[name]
    assert model._tokenreduce.info.has_class_token == (PREFIX[name] == 1)


@pytest.mark.parametrize("reducer", sorted(SETTINGS))
@pytest.mark.parametrize("name", ["CLIPVisionModelWithProjection", "SiglipVisionModel", "SiglipModel"])
def test_every_reducer_the_model_allows_runs(name, reducer):
    model = make(name, "sdpa")
    if PREFIX[name] == 0 and reducer in NEEDS_CLASS_TOKEN:
        with pytest.raises(ConfigError, match="class token"):
            tokenreduce.apply(model, reducer, **SETTINGS[reducer])
        assert not hasattr(model, "_tokenreduce")
        return
    tokenreduce.apply(model, reducer, **SETTINGS[reducer])
    with torch.no_grad():
        out = run(model, images())
    stats = tokenreduce.stats(model)
    assert torch.isfinite(pooled(out)).all() and pooled(out).shape[0] == 2
    assert reducer == "none" or sum(stats["removed"]) > 0
    assert stats["tokens"][0] == 64 + PREFIX[name]


def test_compose_with_a_class_token_part_is_refused_on_siglip():
    with pytest.raises(ConfigError, match="class token"):
        tokenreduce.apply(make("SiglipVisionModel"), "compose", parts=[{"name": "evit", "layers": [1], "ratio": 0.8}])


@pytest.mark.parametrize("attn", IMPLS)
def test_siglip_pooling_sees_the_sizes(attn):
    """The pooling head's probe attends with log(size) on each key: a merged token counts as the patches
    it stands for (as proportional attention in the layers)."""
    model = tokenreduce.apply(make("SiglipVisionModel", attn), "tome", r=8)
    with torch.no_grad():
        out = model(images())
        sizes = model._tokenreduce.last_state.sizes
        head = model.head
        x = out.last_hidden_state
        attn_mod = head.attention
        w_q, w_k, w_v = attn_mod.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn_mod.in_proj_bias.chunk(3)
        heads, dim = attn_mod.num_heads, x.shape[-1] // attn_mod.num_heads
        q = (head.probe @ w_q.T + b_q).view(1, 1, heads, dim).transpose(1, 2)
        k = (x @ w_k.T + b_k).view(2, -1, heads, dim).transpose(1, 2)
        v = (x @ w_v.T + b_v).view(2, -1, heads, dim).transpose(1, 2)
        logits = q @ k.transpose(2, 3) / dim**0.5 + sizes.log().transpose(1, 2).unsqueeze(1)
        y = attn_mod.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 1, -1))
        want = (y + head.mlp(head.layernorm(y)))[:, 0]
    assert sizes is not None and sizes.sum(1).eq(64).all() and sizes.max() > 1
    torch.testing.assert_close(out.pooler_output, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reducer", [n for n in SETTINGS if n not in NEEDS_CLASS_TOKEN | {"random"}])
def test_sample_output_does_not_depend_on_the_batch(reducer):
    model = tokenreduce.apply(make("SiglipVisionModel"), reducer, **SETTINGS[reducer])
    x = images(batch=4)
    with torch.no_grad():
        together = model(x).pooler_output
        alone = torch.cat([model(x[i : i + 1]).pooler_output for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, reducer", [(n, r) for n in ("CLIPVisionModelWithProjection", "SiglipVisionModel",
                                                               "CLIPModel") for r in ("tome", "mctf", "dynamicvit", "evit")
                                           if PREFIX[n] or r not in NEEDS_CLASS_TOKEN])
def test_gradients_reach_every_vision_parameter(name, reducer):
    model = tokenreduce.apply(make(name), reducer, **SETTINGS[reducer]).train()

    class Pooled(torch.nn.Module):  # parameters_without_gradient calls model(x) and wants a tensor
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            if name in DUAL:
                return self.inner.get_image_features(pixel_values=x).pooler_output
            return pooled(self.inner(x))

    missing = parameters_without_gradient(Pooled(), images())
    vision = ("inner.vision_model.", "inner.visual_projection.", "inner.token_reducer.")
    if name in DUAL:
        missing = [n for n in missing if n.startswith(vision)]
    assert missing == []


def test_a_copy_and_transformers_checkpointing_give_the_same_gradients():
    import copy

    model = tokenreduce.apply(make("CLIPModel"), "mctf", **SETTINGS["mctf"]).train()
    twin = copy.deepcopy(model)  # the copy's tower links to the copy
    assert twin.vision_model.__dict__["_tr_link"].owner is twin
    enable = getattr(twin, "activation_checkpointing_enable", None) or twin.gradient_checkpointing_enable
    enable()
    assert twin.vision_model.encoder.layers[0].gradient_checkpointing
    for m in (model, twin):
        m.get_image_features(pixel_values=images()).pooler_output.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- ToMe as a plain loop ------------------------------------------------------------------------------
def _reference_tome(model, x, r: int) -> torch.Tensor:
    """ToMe by hand through CLIPVisionModelWithProjection: embeddings and pre_layrnorm, then per layer the
    attention with the log-size bias, matching on the keys averaged over heads, size-weighted merge after
    the attention residual, then the MLP; the class token through post_layernorm and the projection."""
    tower = model.vision_model
    tokens = tower.pre_layrnorm(tower.embeddings(x))
    outputs = []
    for b in range(x.shape[0]):
        t, sizes = tokens[b], torch.ones(tokens.shape[1])
        for layer in tower.encoder.layers:
            attn = layer.self_attn
            h = layer.layer_norm1(t)
            q, k, v = (p(h).view(len(h), attn.num_heads, -1).transpose(0, 1)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            probs = (q @ k.transpose(1, 2) * attn.scale + sizes.log()).softmax(-1)
            t = t + attn.out_proj((probs @ v).transpose(0, 1).reshape(len(h), -1))
            groups = _brute_force_groups(k.mean(0), r, 1)
            t = torch.stack([(t[g] * sizes[g, None]).sum(0) / sizes[g].sum() for g in groups])
            sizes = torch.stack([sizes[g].sum() for g in groups])
            t = t + layer.mlp(layer.layer_norm2(t))
        outputs.append(model.visual_projection(tower.post_layernorm(t[0])))
    return torch.stack(outputs)


@pytest.mark.parametrize("attn", IMPLS)
def test_tome_equals_a_plain_loop(attn):
    model = make("CLIPVisionModelWithProjection", attn)
    x = images()
    with torch.no_grad():
        want = _reference_tome(model, x, r=8)
        got = tokenreduce.apply(model, "tome", r=8)(x).image_embeds
    assert tokenreduce.stats(model)["tokens"] == [1 + n for n in (64, 56, 48, 40, 32)]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- cost ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", VISION_MODELS)
def test_analytic_macs_equal_flop_counter(name, attn):
    model = make(name, attn)
    for reducer, params in [("none", {}), ("tome", {"r": 8}), ("mctf", SETTINGS["mctf"])]:
        tokenreduce.apply(model, reducer, **params)
        stats_macs, counted = _flop_counter_macs(model, images())
        assert stats_macs == counted, reducer


def test_dual_encoder_macs_are_the_image_path():
    """A dual encoder's MACs are those of its image features (tower and projection): the text tower runs
    unreduced and is not counted."""
    model = tokenreduce.apply(make("CLIPModel"), "tome", r=8)
    twin = tokenreduce.apply(make("CLIPVisionModelWithProjection"), "tome", r=8)
    with torch.no_grad():
        model(input_ids=text(), pixel_values=images())
        twin(images())
    assert tokenreduce.stats(model)["macs_parts"] == tokenreduce.stats(twin)["macs_parts"]


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"output_attentions": True}, "output_attentions=True is not supported"),
    ({"output_hidden_states": True}, "output_hidden_states=True is not supported"),
])
@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipModel"])
def test_refused_arguments_are_named_before_any_compute(name, kwargs, words):
    model = tokenreduce.apply(make(name), "tome", r=4)
    tower = model if name == "CLIPVisionModel" else model.vision_model
    calls = []
    tower.embeddings.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match=words):
        if name in DUAL:
            model(input_ids=text(), pixel_values=images(), **kwargs)
        else:
            model(images(), **kwargs)
    assert not calls


@pytest.mark.parametrize("name", ["CLIPTextModel", "CLIPTextModelWithProjection", "SiglipTextModel"])
def test_text_towers_are_the_text_adapters(name):
    """This adapter does not claim the text classes (tests/test_hf_clip_text.py reduces them); its refusal
    of one, asked directly, names the text adapter."""
    config = (transformers.CLIPTextConfig if name.startswith("CLIP") else transformers.SiglipTextConfig)(**TEXT)
    model = getattr(transformers, name)(config)
    assert name in hf_clip.TEXT_CLASSES and adapter_for(model).name != "hf_clip"
    with pytest.raises(ConfigError, match="a text tower is reduced by the CLIP/SigLIP text adapter"):
        hf_clip.describe(model)
    assert not hasattr(model, "_tokenreduce")


def test_an_attention_implementation_without_a_float_mask_is_refused():
    check_flash_attention_refused(make("SiglipVisionModel"))


def test_an_image_classifier_is_refused_naming_the_supported_classes():
    torch.manual_seed(0)
    model = transformers.CLIPForImageClassification(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                                            num_labels=3))
    with pytest.raises(ConfigError) as err:
        tokenreduce.apply(model, "tome", r=2)
    assert "CLIPForImageClassification" in str(err.value) and all(n in str(err.value) for n in hf_clip.SUPPORTED)
    assert not hasattr(model, "_tokenreduce")


def test_missing_transformers_says_how_to_install_it(monkeypatch):
    check_missing_transformers_refused(make("SiglipVisionModel"), hf_clip.MODULES, monkeypatch)
