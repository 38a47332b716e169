"""The Hugging Face transformers CLIP/SigLIP text adapter (CLIPTextModel, CLIPTextModelWithProjection,
SiglipTextModel, and the text tower of CLIPModel/SiglipModel): exact when nothing is removed, for both
attention implementations, on unpadded and padded batches; `remove`; a padded batch gives each sequence
its output alone, for every reducer; padding never merges; the first and the pooled tokens are kept;
CLIP's causal rule (no token reads a later position); ToMe against a plain loop; gradients; MACs equal
FlopCounterMode; both towers of a dual encoder reduced at once; refusals with the reason."""

import inspect

import pytest
import torch
from conftest import counted_flops
from hf_checks import check_flash_attention_refused
from reduction_checks import parameters_without_gradient
from test_hf_adapter import _brute_force_groups
from test_invariants import PER_SAMPLE_DRAW, SEQUENCE_REDUCERS
from test_invariants import SETTINGS as INVARIANT_SETTINGS

import tokenreduce
from tokenreduce.adapters import adapter_for, adapters, hf_clip, hf_clip_text, hf_text
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnsupportedModelError
from tokenreduce.reducers import mctf

transformers = pytest.importorskip("transformers")

SETTINGS = {**INVARIANT_SETTINGS, "mstm": {**INVARIANT_SETTINGS["mstm"], "fusion": False}}  # layers 1, 3 exist
IMPLS = ("eager", "sdpa")
DEPTH = 4
BOS, EOS, PAD = 97, 98, 1
TEXT = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": DEPTH, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 32, "bos_token_id": BOS, "eos_token_id": EOS,
        "pad_token_id": PAD}
VISION = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64,
          "image_size": 32, "patch_size": 4}  # 8x8 patches
CONFIGS = {
    "CLIPTextModel": lambda **kw: transformers.CLIPTextConfig(**{**TEXT, **kw}, projection_dim=16),
    "CLIPTextModelWithProjection": lambda **kw: transformers.CLIPTextConfig(**{**TEXT, **kw}, projection_dim=16),
    "SiglipTextModel": lambda **kw: transformers.SiglipTextConfig(**{**TEXT, **kw}, projection_size=16),
}
DUAL = {
    "CLIPModel": lambda **kw: transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16, **kw),
    "SiglipModel": lambda **kw: transformers.SiglipConfig(text_config=TEXT, vision_config=VISION, **kw),
}
LENGTH = 16
COUNTS = [16, 9, 16, 4, 12]  # real tokens of each sequence of the padded batch


def make(name: str, attn: str = "eager", **config) -> torch.nn.Module:
    torch.manual_seed(0)
    configs = {**CONFIGS, **DUAL}
    return getattr(transformers, name)(configs[name](attn_implementation=attn, **config)).eval()


def tokens(counts=COUNTS, length: int = LENGTH, seed: int = 0) -> dict:
    """input_ids (BOS, random words, EOS, then padding) and attention_mask."""
    counts = torch.tensor(counts)
    ids = torch.randint(3, 90, (len(counts), length), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(length) < counts[:, None]
    ids[:, 0] = BOS
    ids[torch.arange(len(counts)), counts - 1] = EOS
    return {"input_ids": ids.masked_fill(~mask, PAD), "attention_mask": mask.long()}


def unpadded(batch: int = 3, length: int = LENGTH) -> dict:
    """No mask; the second sequence has its EOS token at position 6 (CLIP pools it; the tokens after it
    are ordinary tokens)."""
    ids = tokens([length] * batch, length)["input_ids"]
    ids[1, 6] = EOS
    return {"input_ids": ids}


def is_siglip(name: str) -> bool:
    return name.startswith("Siglip")


def pooled(out) -> torch.Tensor:
    return out["text_embeds"] if "text_embeds" in out else out["pooler_output"]


def run_positions(name: str, count: int, length: int = LENGTH) -> list[int]:
    """The input positions a sequence of `count` real tokens runs: its real tokens, and SigLIP's pooled
    last position where it is padding."""
    return list(range(count)) + ([length - 1] if is_siglip(name) and count < length else [])


def test_every_supported_class_is_tested_and_claimed_by_one_adapter():
    assert set(CONFIGS) == set(hf_clip_text.SUPPORTED) == set(hf_clip.TEXT_CLASSES)
    assert set(SETTINGS) == SEQUENCE_REDUCERS
    for name in [*CONFIGS, *DUAL]:
        model = make(name)
        claimed = [a.name for a in adapters().values() if a.claims(model)]
        assert claimed == ["hf_clip" if name in DUAL else "hf_clip_text"], name
        if name in DUAL:
            assert [a.name for a in adapters().values() if a.claims(model.text_model)] == ["hf_clip_text"]


# --- exact when nothing is removed ----------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CONFIGS)
def test_zero_reduction_and_remove_are_the_unpatched_model(name, attn):
    model = make(name, attn)
    original, signature = type(model), inspect.signature(model.forward)
    tower = model.text_model if name.endswith("Projection") else model
    tower_class = type(tower)
    batch, padded = unpadded(), tokens()
    keys = ("last_hidden_state", "pooler_output", "text_embeds")
    with torch.no_grad():
        want, want_padded = model(**batch), model(**padded)
        for reducer, params in [("tome", {"r": 0}), ("none", {}), ("pitome", {"ratio": 1.0})]:
            tokenreduce.apply(model, reducer, **params)
            assert adapter_for(model).name == "hf_clip_text"
            assert inspect.signature(model.forward) == signature
            got = model(**batch)
            assert type(got) is type(want)
            for key in keys:
                if key in want:
                    torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
            assert tokenreduce.stats(model)["removed"] == [0] * DEPTH
            got_padded = model(**padded)
            torch.testing.assert_close(pooled(got_padded), pooled(want_padded), rtol=0, atol=1e-5)
            mask = hf_text.reduced_mask(model)
            for b, count in enumerate(COUNTS):  # the real tokens (and SigLIP's pooled padding), zeros after
                positions = run_positions(name, count)
                assert mask[b].sum() == len(positions)
                torch.testing.assert_close(got_padded.last_hidden_state[b, : len(positions)],
                                           want_padded.last_hidden_state[b, positions], rtol=0, atol=1e-5)
                assert (got_padded.last_hidden_state[b, len(positions):] == 0).all()
        tokenreduce.remove(model)
        restored = model(**batch)
    assert type(model) is original and model.forward.__func__ is original.forward
    assert type(tower) is tower_class and "_tr_link" not in tower.__dict__
    assert not hasattr(model, "token_reducer") and not hasattr(model, "_tokenreduce")
    for key in keys:
        if key in want:
            torch.testing.assert_close(restored[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("config", [{"eos_token_id": 2}, {"pad_token_id": EOS}])
def test_clip_pools_as_transformers_does(config):
    """The legacy eos_token_id 2 pools the largest id; a sequence whose EOS lies in its padding (no EOS
    among its real tokens, padding of EOS) pools that padding position, a query over the real tokens."""
    model = make("CLIPTextModel", **config)
    batch = tokens([16, 7, 5, 12])
    ids = batch["input_ids"]
    if config.get("eos_token_id") == 2:
        ids[1, 3] = EOS  # the largest id: sequence 1 pools position 3
        ids[2, 4] = 60
        ids[2, 10] = EOS  # sequence 2 pools position 10, in its padding
    else:
        ids[2, 1:5] = ids[2, 1:5].clamp(max=90)
        ids[2, 5:] = EOS  # sequence 2 pools position 5, its first padding
    pooled_at = hf_clip_text.pooled_positions(model, ids, clip=True)
    assert pooled_at.tolist() == [15, 3 if config.get("eos_token_id") == 2 else 6, pooled_at[2], 11]
    assert pooled_at[2] >= 5
    with torch.no_grad():
        want = model(**batch)
        tokenreduce.apply(model, "tome", r=0)
        got = model(**batch)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=1e-5)
        assert hf_text.reduced_mask(model).sum(1).tolist() == [16, 7, 6, 12]  # sequence 2: and its pooled padding
        torch.testing.assert_close(got.last_hidden_state[2, :6], want.last_hidden_state[2, [0, 1, 2, 3, 4, pooled_at[2]]],
                                   rtol=0, atol=1e-5)
        tokenreduce.apply(model, "tome", r=2)
        together = model(**batch).pooler_output
        for i in range(4):
            alone = model(input_ids=ids[i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]).pooler_output
            torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-5)


def test_tokens_after_the_eos_can_be_left_out():
    """after_eos="drop": the tokens after CLIP's EOS token do not run (they cannot change it); the pooled
    output is unchanged at zero reduction and whatever follows the EOS token."""
    model = make("CLIPTextModelWithProjection")
    batch = unpadded()
    changed = batch["input_ids"].clone()
    changed[1, 7:] = torch.randint(3, 90, (LENGTH - 7,))
    with torch.no_grad():
        want = model(**batch)
        tokenreduce.apply(model, "tome", r=0, adapter_options={"after_eos": "drop"})
        got = model(**batch)
        assert hf_text.reduced_mask(model).sum(1).tolist() == [16, 7, 16]
        torch.testing.assert_close(got.text_embeds, want.text_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.last_hidden_state[1, :7], want.last_hidden_state[1, :7], rtol=0, atol=1e-5)
        assert (got.last_hidden_state[1, 7:] == 0).all()
        tokenreduce.apply(model, "tome", r=2)  # the options stay
        assert model._tokenreduce.options == {"after_eos": "drop"}
        reduced = model(**batch).text_embeds
        groups = {tuple(g["images"]): g["tokens"] for g in tokenreduce.stats(model)["groups"]}
        assert groups == {(1,): [7, 5, 4, 3, 3], (0, 2): [16, 14, 12, 10, 8]}
        torch.testing.assert_close(model(input_ids=changed).text_embeds[1], reduced[1], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="after_eos='all' is invalid; allowed: 'keep', 'drop'"):
        tokenreduce.apply(model, "tome", r=2, adapter_options={"after_eos": "all"})


# --- the text tower of a dual encoder, alone or with the image tower ----------------------------------
def images(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _features(model, batch: dict, x: torch.Tensor) -> dict:
    out = model(**batch, pixel_values=x)
    return {"logits_per_text": out.logits_per_text, "text_embeds": out.text_embeds, "image_embeds": out.image_embeds,
            "text": model.get_text_features(**batch).pooler_output,
            "image": model.get_image_features(pixel_values=x).pooler_output}


def _assert_same(got: dict, want: dict, keys, atol: float):
    for key in keys:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("name", DUAL)
def test_the_text_tower_of_a_dual_encoder_is_reduced_on_its_own(name):
    model = make(name, "sdpa")
    batch, x = tokens([16, 9, 12]), images()
    text = ("text", "text_embeds")
    image = ("image", "image_embeds")
    with torch.no_grad():
        want = _features(model, batch, x)
        tokenreduce.apply(model.text_model, "tome", r=0)
        assert adapter_for(model.text_model).name == "hf_clip_text" and not hasattr(model, "_tokenreduce")
        _assert_same(_features(model, batch, x), want, want, atol=1e-5)
        # the image tower first, then the text tower, each with its own reducer
        tokenreduce.remove(model.text_model)
        tokenreduce.apply(model, "tome", r=8)
        vision_only = _features(model, batch, x)
        tokenreduce.apply(model.text_model, "pitome", ratio=0.8)
        both = _features(model, batch, x)
        assert tokenreduce.stats(model)["tokens"][0] == 64 + (name == "CLIPModel")
        text_stats = tokenreduce.stats(model.text_model)
        assert text_stats["reducer"] == "pitome" and [g["tokens"][0] for g in text_stats["groups"]] == [
            9 + (name == "SiglipModel"), 12 + (name == "SiglipModel"), 16]
        assert tokenreduce.reducer_of(model).name == "tome"
        _assert_same(both, vision_only, image, atol=0)
        assert not torch.allclose(both["text"], want["text"])
        assert both["logits_per_text"].shape == (3, 2)
        # removing the image tower's reducer leaves the text tower's, and the other way round
        tokenreduce.remove(model)
        text_only = _features(model, batch, x)
        _assert_same(text_only, both, text, atol=0)
        _assert_same(text_only, want, image, atol=0)
        tokenreduce.apply(model, "tome", r=8)  # the image tower again, with the text tower reduced
        _assert_same(_features(model, batch, x), both, both, atol=0)
        tokenreduce.remove(model.text_model)
        _assert_same(_features(model, batch, x), vision_only, vision_only, atol=0)
        tokenreduce.remove(model)
        _assert_same(_features(model, batch, x), want, want, atol=0)
    assert type(model) is getattr(transformers, name) and type(model.text_model).__name__.endswith("TextModel")
    assert "_tr_link" not in model.vision_model.__dict__ and not hasattr(model.text_model, "_tokenreduce")
    assert set(model.state_dict()) == set(make(name).state_dict())


# --- padded batches: per sequence, padding never merges, protected tokens ----------------------------
@pytest.mark.parametrize("name", ["CLIPTextModel", "SiglipTextModel"])
def test_token_counts_follow_the_schedule_per_sequence(name):
    model = tokenreduce.apply(make(name), "tome", r=3)
    with torch.no_grad():
        out = model(**tokens())
    stats = tokenreduce.stats(model)
    groups = {tuple(g["images"]): g for g in stats["groups"]}
    extra = int(is_siglip(name))  # SigLIP's pooled last position, padding in the shorter sequences
    assert groups[(0, 2)]["tokens"] == [16, 13, 10, 7, 5]
    for b, count in [(1, 9), (3, 4), (4, 12)]:
        assert groups[(b,)]["removed"] == model.token_reducer.removal_counts(DEPTH, count + extra - 2)
        assert groups[(b,)]["tokens"][0] == count + extra
    assert out.last_hidden_state.shape == (5, 5, 32)
    assert stats["macs"] == round(sum(g["macs"] * len(g["images"]) for g in stats["groups"]) / 5)


@pytest.mark.parametrize("reducer", sorted(set(SETTINGS) - PER_SAMPLE_DRAW))
@pytest.mark.parametrize("name", CONFIGS)
def test_each_sequence_of_a_padded_batch_gets_its_output_alone(name, reducer):
    """CLIP alone: the sequence cut to its real tokens; SigLIP alone: with its padding and mask (it pools
    the last position, padding included)."""
    model = tokenreduce.apply(make(name, "sdpa"), reducer, **SETTINGS[reducer])
    batch = tokens()
    with torch.no_grad():
        together = model(**batch)
        width = hf_text.reduced_mask(model).sum(1).tolist()
        removed = sum(sum(g["removed"]) for g in tokenreduce.stats(model)["groups"])
        for i, count in enumerate(COUNTS):
            if is_siglip(name):
                alone = model(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1])
            else:
                alone = model(input_ids=batch["input_ids"][i : i + 1, :count])
            n = alone.last_hidden_state.shape[1]
            assert n == width[i]
            torch.testing.assert_close(together.last_hidden_state[i, :n], alone.last_hidden_state[0], rtol=1e-4,
                                       atol=1e-5)
            assert (together.last_hidden_state[i, n:] == 0).all()
            torch.testing.assert_close(pooled(together)[i], pooled(alone)[0], rtol=1e-4, atol=1e-5)
    assert reducer == "none" or removed > 0


@pytest.mark.parametrize("reducer", sorted(set(SETTINGS) - {"none"}))
@pytest.mark.parametrize("name", ["CLIPTextModel", "SiglipTextModel"])
def test_padding_never_merges_and_the_first_and_pooled_tokens_are_kept(name, reducer):
    model = tokenreduce.apply(make(name), reducer, **SETTINGS[reducer], trace_source=True)
    with torch.no_grad():
        model(**tokens())
    source = tokenreduce.stats(model)["source"]
    sizes = model._tokenreduce.last_state.sizes[..., 0]
    real = hf_text.reduced_mask(model).sum(1).tolist()
    for b, count in enumerate(COUNTS):
        positions = run_positions(name, count)
        outside = [p for p in range(LENGTH) if p not in positions]
        assert (source[b, outside] == -1).all()  # padding is in no token
        ran = source[b, positions]
        assert ((ran >= -1) & (ran < real[b])).all()  # a real token is in a real token, or dropped
        assert torch.equal(sizes[b, real[b] :], torch.zeros(sizes.shape[1] - real[b]))  # padding has size 0
        for token, slot in [(0, 0), (positions[-1], real[b] - 1)]:  # first and pooled: alone, in their places
            assert source[b, token] == slot and (source[b] == slot).sum() == 1 and sizes[b, slot] == 1
        # the tokens come back in order of position: of the latest input each stands for
        latest = [max(p for p in positions if source[b, p] == t) for t in range(real[b])]
        assert latest == sorted(latest)
        if reducer not in ("topk", "norm", "random", "dynamicvit", "zerotprune", "diffrate", "ppt"):
            assert sizes[b, : real[b]].sum() == len(positions)  # merging only: each token counted once


# --- CLIP is causal -----------------------------------------------------------------------------------
class _Replay:
    """Record every merge of a pass (ReductionState.merge: the assignment and the weights; and MCTF's
    matching, which also merges its attention map), then give the next pass the same ones: the
    reduction's choices fixed, what flows between the tokens is what the test looks at."""

    def __init__(self, monkeypatch):
        self.recorded, self.replaying, self.index = [], False, 0
        merge, matching = ReductionState.merge, mctf.mctf_matching

        def merging(state, x, assignment, mode="wavg", **kwargs):
            assignment, kwargs = self._take((assignment, kwargs))
            return merge(state, x, assignment, mode, **kwargs)

        monkeypatch.setattr(ReductionState, "merge", merging)
        monkeypatch.setattr(mctf, "mctf_matching", lambda *args, **kwargs: self._take(matching(*args, **kwargs)))

    def _take(self, value):
        if self.replaying:
            value, self.index = self.recorded[self.index], self.index + 1
        else:
            self.recorded.append(value)
        return value


def _latest(source: torch.Tensor, tokens: int) -> list[int]:
    """Each output token's position: the latest input position it stands for."""
    return [max((p for p in range(len(source)) if source[p] == t), default=-1) for t in range(tokens)]


# MCTF pools its probability map with the attention each token receives (from every token): a choice
# taken over the whole sequence, as the others, which replaying the merges does not fix; its size pooling
# checks the masked reuse of the map
CAUSAL_SETTINGS = {**SETTINGS, "mctf": {**SETTINGS["mctf"], "pooling": "size", "min_tokens": 2}}


@pytest.mark.parametrize("reducer", sorted(set(SETTINGS) - {"none"}))
def test_no_token_reads_a_later_position(reducer, monkeypatch):
    """With the reduction's choices fixed, changing the token at position q changes no output token whose
    latest input is before q (brute force over the source map), for every q; it changes the pooled EOS
    token when that is after q."""
    options = {"after_eos": "drop" if reducer == "evit" else "keep"}
    model = tokenreduce.apply(make("CLIPTextModel", "sdpa"), reducer, **CAUSAL_SETTINGS[reducer], trace_source=True,
                              adapter_options=options)
    ids = unpadded(batch=2)["input_ids"]  # sequence 0 pools its last token, sequence 1 its EOS token at 6
    replay = _Replay(monkeypatch)
    with torch.no_grad():
        want = model(input_ids=ids)
        source = tokenreduce.stats(model)["source"]
        assert sum(tokenreduce.stats(model)["removed"]) > 0
        replay.replaying = True
        for q in range(1, LENGTH - 1):
            changed = ids.clone()
            changed[:, q] = torch.where(ids[:, q] == EOS, EOS, torch.where(ids[:, q] == 50, 51, 50))  # EOS stays
            replay.index = 0
            got = model(input_ids=changed)
            assert torch.equal(tokenreduce.stats(model)["source"], source) and replay.index == len(replay.recorded)
            for b in range(2):
                latest = _latest(source[b], want.last_hidden_state.shape[1])
                before = [t for t, p in enumerate(latest) if 0 <= p < q]
                torch.testing.assert_close(got.last_hidden_state[b, before], want.last_hidden_state[b, before],
                                           rtol=0, atol=0, msg=f"q={q}")
            assert not torch.allclose(got.pooler_output[0], want.pooler_output[0])
            if q >= 6:
                torch.testing.assert_close(got.pooler_output[1], want.pooler_output[1], rtol=0, atol=0)


def _reference_tome(model, ids: torch.Tensor, r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ToMe by hand through a CLIPTextModel, one sequence at a time, without a mask: the pooled EOS token
    placed first, then the others; per layer the attention with the log-size bias, key j seen by query i
    only when the latest input position of j's tokens is not after i's (by loops over the groups);
    matching on the keys averaged over heads, size-weighted merge after the attention residual, the MLP;
    final_layer_norm; the tokens ordered by their latest positions. Returns each sequence's tokens and
    pooled output."""
    results = []
    for row in ids:
        eos = int((row == EOS).nonzero()[0])
        order = [eos, *[p for p in range(len(row)) if p != eos]]
        t = model.embeddings(input_ids=row[None])[0][order]
        members, sizes = [[p] for p in order], torch.ones(len(order))
        for layer in model.encoder.layers:
            attn = layer.self_attn
            h = layer.layer_norm1(t)
            q, k, v = (p(h).view(len(h), attn.num_heads, -1).transpose(0, 1)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            latest = [max(m) for m in members]
            visible = torch.tensor([[latest[j] <= latest[i] for j in range(len(t))] for i in range(len(t))])
            logits = (q @ k.transpose(1, 2) * attn.scale + sizes.log()).masked_fill(~visible, float("-inf"))
            t = t + attn.out_proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(len(h), -1))
            removal = min(r, (len(t) - 2) // 2)
            if removal:
                groups = _brute_force_groups(k.mean(0), removal, 2)
                t = torch.stack([(t[g] * sizes[g, None]).sum(0) / sizes[g].sum() for g in groups])
                sizes = torch.stack([sizes[g].sum() for g in groups])
                members = [sum((members[i] for i in g), []) for g in groups]
            t = t + layer.mlp(layer.layer_norm2(t))
        t = model.final_layer_norm(t)
        results.append((t[sorted(range(len(t)), key=lambda i: max(members[i]))], t[0]))
    return results


@pytest.mark.parametrize("attn", IMPLS)
def test_tome_equals_a_plain_loop(attn):
    model = make("CLIPTextModel", attn)
    ids = unpadded()["input_ids"]  # the second sequence's EOS token at 6, ordinary tokens after it
    with torch.no_grad():
        want = _reference_tome(model, ids, r=3)
        got = tokenreduce.apply(model, "tome", r=3)(input_ids=ids)
    assert tokenreduce.stats(model)["tokens"] == [16, 13, 10, 7, 5]
    for i, (hidden, pooled_output) in enumerate(want):
        torch.testing.assert_close(got.last_hidden_state[i], hidden, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.pooler_output[i], pooled_output, rtol=1e-4, atol=1e-5)


# --- training -----------------------------------------------------------------------------------------
class _Pooled(torch.nn.Module):  # parameters_without_gradient calls model(x) and wants a tensor
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, batch):
        return pooled(self.inner(**batch))


@pytest.mark.parametrize("reducer", ["tome", "mctf", "evit", "dynamicvit"])
@pytest.mark.parametrize("name", ["CLIPTextModelWithProjection", "SiglipTextModel"])
def test_gradients_reach_every_parameter(name, reducer):
    model = tokenreduce.apply(make(name), reducer, **SETTINGS[reducer]).train()
    # a padded batch of mixed lengths (one length for the reducers with training losses of the whole pass)
    batch = tokens([14, 14] if reducer in ("dynamicvit", "mctf") else [16, 11, 13])
    assert parameters_without_gradient(_Pooled(model), batch) == []


@pytest.mark.parametrize("reducer", ["tome", "topk", "mctf"])
def test_a_copy_and_transformers_checkpointing_give_the_same_gradients(reducer):
    """A checkpointed step computes its mask again in the backward pass: from what it was given, not from
    the state, which has moved on by then (Top-K asks for the attention probabilities)."""
    import copy

    model = tokenreduce.apply(make("CLIPTextModelWithProjection"), reducer, **SETTINGS[reducer]).train()
    twin = copy.deepcopy(model)  # the copy's tower links to the copy
    assert twin.text_model.__dict__["_tr_link"].owner is twin
    twin.activation_checkpointing_enable()
    assert twin.text_model.encoder.layers[0].gradient_checkpointing
    batch = tokens([16, 11, 13] if reducer != "mctf" else [14, 14])
    for m in (model, twin):
        m(**batch).text_embeds.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- cost ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CONFIGS)
def test_analytic_macs_equal_flop_counter(name, attn):
    model = make(name, attn)
    for reducer, params in [("none", {}), ("tome", {"r": 3}), ("mctf", SETTINGS["mctf"])]:
        tokenreduce.apply(model, reducer, **params)
        flops = counted_flops(model, **unpadded(batch=2))
        assert tokenreduce.stats(model)["macs"] * 2 * 2 == flops, reducer
        flops = counted_flops(model, **tokens())  # padding costs nothing
        assert sum(g["macs"] * len(g["images"]) for g in tokenreduce.stats(model)["groups"]) * 2 == flops, reducer


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"output_hidden_states": True}, "output_hidden_states=True is not supported"),
    ({"output_attentions": True}, "output_attentions=True is not supported"),
    ({"inputs_embeds": torch.zeros(2, 16, 32)}, "inputs_embeds not supported on the text tower"),
    ({"input_ids": None}, "input_ids=None is invalid"),
    ({"attention_mask": "left"}, "padding before real tokens.*padding_side='right'"),
    ({"attention_mask": "one token"}, "a sequence with 1 real tokens; allowed: at least 2"),
])
@pytest.mark.parametrize("name", ["CLIPTextModelWithProjection", "CLIPModel"])
def test_refused_arguments_are_named_before_any_compute(name, kwargs, words):
    model = make(name)
    target = model.text_model if name == "CLIPModel" else model
    tokenreduce.apply(target, "tome", r=2)
    calls = []
    model.text_model.embeddings.register_forward_hook(lambda *a: calls.append(1))
    batch = tokens([16, 10])
    if kwargs.get("attention_mask") == "left":
        kwargs = {"attention_mask": batch["attention_mask"].flip(1)}
    elif kwargs.get("attention_mask") == "one token":
        kwargs = {"attention_mask": tokens([16, 1])["attention_mask"]}
    with pytest.raises(ConfigError, match=words):
        if name == "CLIPModel":
            model.get_text_features(**{**batch, **kwargs})
        else:
            model(**{**batch, **kwargs})
    assert not calls


def test_refusals_by_configuration_and_input():
    model = tokenreduce.apply(make("CLIPTextModel"), "tome", r=2, adapter_options={"after_eos": "drop"})
    ids = tokens([16])["input_ids"]
    ids[0, 0] = EOS  # pooled at position 0: nothing runs but the EOS token
    with pytest.raises(ConfigError, match="pools its token at position 0 and leaves 1 token.*at least 2"):
        model(input_ids=ids)
    model.config.output_hidden_states = True
    with pytest.raises(ConfigError, match=r"output_hidden_states=True is not supported.*config\.output_hidden_states"):
        model(**tokens())
    model = tokenreduce.apply(make("CLIPTextModel"), "evit", **SETTINGS["evit"])
    with pytest.raises(ConfigError, match="evit: its fused token .* the tokens after it .*'after_eos': 'drop'"):
        model(**unpadded())  # the second sequence has tokens after its EOS token
    model(**tokens())  # each sequence ends with its EOS token
    tokenreduce.apply(model, "evit", **SETTINGS["evit"], adapter_options={"after_eos": "drop"})
    assert torch.isfinite(model(**unpadded()).pooler_output).all()
    model = tokenreduce.apply(make("SiglipTextModel"), "mstm", ratio=0.7, layers=[1, 3])
    with pytest.raises(ConfigError, match="fusion pools a square grid of patches.*allowed: fusion=False"):
        model(**tokens())
    model = tokenreduce.apply(make("CLIPTextModel"), "dynamicvit", **SETTINGS["dynamicvit"]).train()
    with pytest.raises(ConfigError, match="dynamicvit trains with losses .* one length, or eval mode"):
        model(**tokens())
    model(**tokens([16, 16]))  # one length (padded): one group


def test_a_tower_reduced_from_its_holder_and_the_holder_of_a_reduced_tower_are_refused():
    model = tokenreduce.apply(make("CLIPTextModelWithProjection"), "tome", r=2)
    with pytest.raises(UnsupportedModelError, match="text tower of a token-reduced CLIPTextModelWithProjection"):
        tokenreduce.apply(model.text_model, "tome", r=2)
    tokenreduce.remove(model)
    tokenreduce.apply(model.text_model, "tome", r=2)
    with pytest.raises(UnsupportedModelError, match=r"text_model already carries a reducer.*remove\(model\.text_model\)"):
        tokenreduce.apply(model, "tome", r=2)
    assert not hasattr(model, "_tokenreduce")


def test_other_classes_are_not_this_adapters():
    with pytest.raises(UnsupportedModelError) as err:
        hf_clip_text.describe(make("CLIPModel"))
    assert all(name in str(err.value) for name in hf_clip_text.SUPPORTED)
    with pytest.raises(ConfigError, match="a text tower is reduced by the CLIP/SigLIP text adapter"):
        hf_clip.describe(make("SiglipTextModel"))


def test_an_attention_implementation_without_a_float_mask_is_refused():
    check_flash_attention_refused(make("SiglipTextModel"))
