"""The Hugging Face transformers text adapter (BERT, RoBERTa, DistilBERT): exact when nothing is removed,
for both attention implementations, on unpadded and padded batches; a padded batch gives each sequence its
output alone, for every reducer; padding never merges; the first and last real tokens are kept; ToMe
against a plain loop; MACs equal FlopCounterMode; size-weighted mean pooling; refusals with the reason."""

import inspect

import pytest
import torch
from conftest import counted_flops
from hf_checks import check_flash_attention_refused
from reduction_checks import parameters_without_gradient
from test_invariants import NEEDS_CLASS_TOKEN, PER_SAMPLE_DRAW, SEQUENCE_REDUCERS
from test_invariants import SETTINGS as INVARIANT_SETTINGS

import tokenreduce
from tokenreduce.adapters import adapter_for, hf_text
from tokenreduce.errors import ConfigError, UnsupportedModelError
from tokenreduce.reducers.base import reducer_class

transformers = pytest.importorskip("transformers")

SETTINGS = {**INVARIANT_SETTINGS, "mstm": {**INVARIANT_SETTINGS["mstm"], "fusion": False}}  # layers 1, 3 exist
IMPLS = ("eager", "sdpa")
DEPTH = 4
CONFIGS = {  # 4 layers, 4 heads, 32 channels, a vocabulary of 100; the classifiers have 3 labels
    "bert": lambda **kw: transformers.BertConfig(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                                 num_labels=3, **kw),
    "roberta": lambda **kw: transformers.RobertaConfig(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4,
                                                       intermediate_size=64, vocab_size=100,
                                                       max_position_embeddings=64, num_labels=3, **kw),
    "distilbert": lambda **kw: transformers.DistilBertConfig(dim=32, n_layers=DEPTH, n_heads=4, hidden_dim=64,
                                                             vocab_size=100, max_position_embeddings=64, num_labels=3,
                                                             **kw),
}
CLASSES = {
    "BertModel": "bert",
    "BertForSequenceClassification": "bert",
    "RobertaModel": "roberta",
    "RobertaForSequenceClassification": "roberta",
    "DistilBertModel": "distilbert",
    "DistilBertForSequenceClassification": "distilbert",
}
CLASSIFIERS = [name for name in CLASSES if name.endswith("Classification")]
OUTPUTS = ("logits", "last_hidden_state", "pooler_output", "loss")
LENGTH = 24
COUNTS = [24, 13, 24, 2, 7]  # real tokens of each sequence of the padded batch


def make(name: str, attn: str = "eager", **config) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[CLASSES[name]](attn_implementation=attn, **config)
    return getattr(transformers, name)(cfg).eval()


def tokens(name: str, counts=COUNTS, length: int = LENGTH, seed: int = 0) -> dict:
    """input_ids (first, then random words, then the end token, then padding) and attention_mask."""
    config = CONFIGS[CLASSES[name]]()
    pad = config.pad_token_id
    ids = torch.randint(5, 100, (len(counts), length), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(length) < torch.tensor(counts)[:, None]
    ids[:, 0] = 2
    ids[torch.arange(len(counts)), torch.tensor(counts) - 1] = 3
    return {"input_ids": ids.masked_fill(~mask, pad), "attention_mask": mask.long()}


def unpadded(name: str, batch: int = 2, length: int = 16) -> dict:
    return {"input_ids": tokens(name, [length] * batch, length)["input_ids"]}


def outputs_of(out) -> dict:
    return {k: out[k] for k in OUTPUTS if k in out and out[k] is not None}


def real_outputs(out, mask) -> dict:
    """The outputs with last_hidden_state's padding left out (a list of each sequence's real tokens)."""
    got = outputs_of(out)
    if "last_hidden_state" in got:
        got["last_hidden_state"] = [h[m.bool()] for h, m in zip(got["last_hidden_state"], mask, strict=True)]
    return got


def assert_close(got: dict, want: dict, atol: float):
    assert got.keys() == want.keys() and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=key)


def test_every_supported_class_is_tested():
    assert set(CLASSES) == set(hf_text.SUPPORTED)
    assert set(SETTINGS) == SEQUENCE_REDUCERS


# --- exact when nothing is removed ----------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CLASSES)
def test_zero_reduction_and_remove_are_the_unpatched_model(name, attn):
    model = make(name, attn)
    original, signature = type(model), inspect.signature(model.forward)
    batch, padded = unpadded(name), tokens(name)
    with torch.no_grad():
        want, want_padded = model(**batch), model(**padded)
        for reducer, params in [("tome", {"r": 0}), ("none", {}), ("pitome", {"ratio": 1.0})]:
            tokenreduce.apply(model, reducer, **params)
            assert inspect.signature(model.forward) == signature
            got = model(**batch)
            assert type(got) is type(want)
            assert_close(outputs_of(got), outputs_of(want), atol=1e-6)
            assert tokenreduce.stats(model)["removed"] == [0] * DEPTH
            got_padded = model(**padded)  # the real tokens; padding is cut to the longest sequence
            mask = hf_text.reduced_mask(model)
            assert torch.equal(mask, padded["attention_mask"][:, : max(COUNTS)])
            assert_close(real_outputs(got_padded, mask), real_outputs(want_padded, padded["attention_mask"]),
                         atol=1e-5)
            if "last_hidden_state" in want_padded:
                assert (got_padded.last_hidden_state[~mask.bool()] == 0).all()
        tokenreduce.remove(model)
        restored = model(**batch)
    assert type(model) is original and model.forward.__func__ is original.forward
    assert not hasattr(model, "token_reducer") and not hasattr(model, "_tokenreduce")
    assert_close(outputs_of(restored), outputs_of(want), atol=0)


@pytest.mark.parametrize("name", ["BertModel", "RobertaModel", "DistilBertModel"])
def test_embeddings_inputs_positions_and_token_types_are_passed_on(name):
    model = make(name)
    padded = tokens(name)
    embeds = model.get_input_embeddings()(padded["input_ids"]).detach()
    extra = {} if name == "DistilBertModel" else {"token_type_ids": (torch.arange(LENGTH) > 5).long().expand(5, -1)}
    positions = torch.arange(LENGTH).flip(0)[None] + 3  # [1, L]
    with torch.no_grad():
        want = [model(inputs_embeds=embeds, attention_mask=padded["attention_mask"], **extra),
                model(**padded, position_ids=positions, **extra)]
        tokenreduce.apply(model, "tome", r=0)
        got = [model(inputs_embeds=embeds, attention_mask=padded["attention_mask"], **extra),
               model(**padded, position_ids=positions, **extra)]
    for g, w in zip(got, want, strict=True):
        assert_close(real_outputs(g, hf_text.reduced_mask(model)), real_outputs(w, padded["attention_mask"]), 1e-5)


def test_labels_loss_and_tuples():
    model = make("BertForSequenceClassification")
    batch, labels = tokens("BertForSequenceClassification"), torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        want = model(**batch, labels=labels)
        want_tuple = model(batch["input_ids"], batch["attention_mask"], return_dict=False)
        tokenreduce.apply(model, "tome", r=0)
        got = model(**batch, labels=labels)
        got_tuple = model(batch["input_ids"], batch["attention_mask"], return_dict=False)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-6)
    assert isinstance(got_tuple, tuple) and len(got_tuple) == len(want_tuple) == 1
    torch.testing.assert_close(got_tuple[0], want_tuple[0], rtol=0, atol=1e-5)


# --- padded batches: per sequence, padding never merges, protected tokens ----------------------------
def test_token_counts_follow_the_schedule_per_sequence():
    model = tokenreduce.apply(make("BertModel"), "tome", r=4)
    with torch.no_grad():
        out = model(**tokens("BertModel"))
    stats = tokenreduce.stats(model)
    groups = {tuple(g["images"]): g for g in stats["groups"]}
    # 2 protected tokens (first and last); ToMe removes 4 of the others a layer, at most half of them
    assert groups[(0, 2)]["tokens"] == [24, 20, 16, 12, 8]
    assert groups[(1,)]["tokens"] == [13, 9, 6, 4, 3]
    assert groups[(4,)]["tokens"] == [7, 5, 4, 3, 3]
    assert groups[(3,)]["tokens"] == [2, 2, 2, 2, 2]
    for count, group in [(24, (0, 2)), (13, (1,)), (7, (4,))]:
        assert groups[group]["removed"] == model.token_reducer.removal_counts(DEPTH, count - 2)
    assert stats["tokens"] == [24, 20, 16, 12, 8]  # the longest sequences set the batch's width
    assert out.last_hidden_state.shape == (5, 8, 32)
    assert hf_text.reduced_mask(model).sum(1).tolist() == [8, 3, 8, 2, 3]
    assert stats["macs"] == round(sum(g["macs"] * len(g["images"]) for g in stats["groups"]) / 5)


@pytest.mark.parametrize("reducer", sorted(set(SETTINGS) - PER_SAMPLE_DRAW))
@pytest.mark.parametrize("name", ["BertModel", "RobertaForSequenceClassification", "DistilBertModel"])
def test_each_sequence_of_a_padded_batch_gets_its_output_alone(name, reducer):
    """The reducers that rank tokens by the class token's attention use the first token as it."""
    model = tokenreduce.apply(make(name, "sdpa"), reducer, **SETTINGS[reducer])
    batch = tokens(name)
    with torch.no_grad():
        together = model(**batch)
        width = hf_text.reduced_mask(model).sum(1).tolist()
        removed = sum(tokenreduce.stats(model)["groups"][-1]["removed"])  # the longest sequences'
        for i, count in enumerate(COUNTS):
            alone = model(input_ids=batch["input_ids"][i : i + 1, :count])
            if "last_hidden_state" in alone:
                n = alone.last_hidden_state.shape[1]
                assert n == width[i]
                torch.testing.assert_close(together.last_hidden_state[i, :n], alone.last_hidden_state[0],
                                           rtol=1e-4, atol=1e-5)
                assert (together.last_hidden_state[i, n:] == 0).all()
            for key in ("pooler_output", "logits"):
                if key in alone:
                    torch.testing.assert_close(together[key][i], alone[key][0], rtol=1e-4, atol=1e-5)
    assert reducer == "none" or removed > 0


@pytest.mark.parametrize("reducer", sorted(set(SETTINGS) - {"none"}))
def test_padding_never_merges_and_the_first_and_last_tokens_are_kept(reducer):
    model = tokenreduce.apply(make("BertModel"), reducer, **SETTINGS[reducer], trace_source=True)
    with torch.no_grad():
        model(**tokens("BertModel"))
    source = tokenreduce.stats(model)["source"]
    sizes = model._tokenreduce.last_state.sizes[..., 0]
    real = hf_text.reduced_mask(model).sum(1).tolist()
    for b, count in enumerate(COUNTS):
        assert (source[b, count:] == -1).all()  # padding is in no token
        kept = source[b, :count]
        assert ((kept >= -1) & (kept < real[b])).all()  # a real token is in a real token, or dropped
        assert torch.equal(sizes[b, real[b] :], torch.zeros(sizes.shape[1] - real[b]))  # padding has size 0
        for token, slot in [(0, 0), (count - 1, real[b] - 1)]:  # first and last: alone, in their places
            assert source[b, token] == slot and (source[b] == slot).sum() == 1 and sizes[b, slot] == 1
        if reducer not in ("topk", "norm", "random", "dynamicvit", "zerotprune", "diffrate", "ppt"):
            assert sizes[b, : real[b]].sum() == count  # merging only: each real token is counted once
    assert (sizes[:, 0] == 1).all()


def test_class_token_reducers_use_the_first_token():
    info = hf_text.describe(make("DistilBertModel"))
    assert info.has_class_token and info.num_prefix == 2 and info.depth == DEPTH
    for reducer in sorted(NEEDS_CLASS_TOKEN):
        reducer_class(reducer)(**SETTINGS[reducer]).check_model(info)


def test_mstm_fusion_is_refused_with_the_reason():
    model = tokenreduce.apply(make("BertModel"), "mstm", ratio=0.7, layers=[1, 3])
    with pytest.raises(ConfigError, match="fusion pools a square grid of patches.*allowed: fusion=False"):
        model(**tokens("BertModel"))


def test_a_reducer_with_pass_losses_is_refused_in_training_on_mixed_lengths():
    model = tokenreduce.apply(make("BertForSequenceClassification"), "dynamicvit", **SETTINGS["dynamicvit"]).train()
    with pytest.raises(ConfigError, match="dynamicvit trains with losses .* one length, or eval mode"):
        model(**tokens("BertForSequenceClassification"))
    model(**tokens("BertForSequenceClassification", counts=[20, 20]))  # one length (padded): one group


# --- ToMe as a plain loop ------------------------------------------------------------------------------
def _brute_force_groups(keys: torch.Tensor, r: int, num_prefix: int) -> list[list[int]]:
    """ToMe's bipartite matching of one sequence by loops: of the non-prefix tokens, A holds those at even
    positions and B those at odd ones; each A token finds its most similar B token (cosine, the first on
    a tie); the r A tokens with the highest such similarity merge into theirs (the earlier on a tie).
    Returns the tokens of each output token: prefix tokens, kept A tokens, then B tokens."""
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


def _reference_tome(model, batch: dict, r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ToMe by hand through a BertModel, one sequence at a time on its real tokens: the last token is
    placed after the first (both kept), attention with the log-size bias, residual and LayerNorm,
    matching on the keys averaged over heads, size-weighted merge, then the feed-forward block; the last
    token is put back last. Returns each sequence's tokens and pooler output."""
    results = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        n = int(mask.sum())
        t = model.embeddings(input_ids=ids[None, :n])[0]
        t = t[[0, n - 1, *range(1, n - 1)]]
        sizes = torch.ones(n)
        for layer in model.encoder.layer:
            attn, out = layer.attention.self, layer.attention.output
            q, k, v = (p(t).view(len(t), attn.num_attention_heads, -1).transpose(0, 1)
                       for p in (attn.query, attn.key, attn.value))
            probs = (q @ k.transpose(1, 2) * attn.scaling + sizes.log()).softmax(-1)
            t = out.LayerNorm(out.dense((probs @ v).transpose(0, 1).reshape(len(t), -1)) + t)
            removal = min(r, (len(t) - 2) // 2)  # at most half of the unprotected tokens
            if removal:
                groups = _brute_force_groups(k.mean(0), removal, 2)
                t = torch.stack([(t[g] * sizes[g, None]).sum(0) / sizes[g].sum() for g in groups])
                sizes = torch.stack([sizes[g].sum() for g in groups])
            t = layer.output.LayerNorm(layer.output.dense(layer.intermediate(t)) + t)
        t = t[[0, *range(2, len(t)), 1]]
        results.append((t, model.pooler(t[None])[0]))
    return results


@pytest.mark.parametrize("attn", IMPLS)
def test_tome_equals_a_plain_loop(attn):
    model = make("BertModel", attn)
    batch = tokens("BertModel", counts=[24, 15, 9], length=24)
    with torch.no_grad():
        want = _reference_tome(model, batch, r=3)
        got = tokenreduce.apply(model, "tome", r=3)(**batch)
    assert [g["tokens"] for g in tokenreduce.stats(model)["groups"]] == [[9, 6, 4, 3, 3], [15, 12, 9, 6, 4],
                                                                        [24, 21, 18, 15, 12]]
    for i, (hidden, pooled) in enumerate(want):
        torch.testing.assert_close(got.last_hidden_state[i, : len(hidden)], hidden, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.pooler_output[i], pooled, rtol=1e-4, atol=1e-5)


# --- training -----------------------------------------------------------------------------------------
class _Logits(torch.nn.Module):  # parameters_without_gradient calls model(x) and wants a tensor
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, batch):
        return self.inner(**batch).logits


@pytest.mark.parametrize("reducer", ["tome", "mctf", "evit", "dynamicvit"])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_gradients_reach_every_parameter(name, reducer):
    model = tokenreduce.apply(make(name), reducer, **SETTINGS[reducer]).train()
    # a padded batch of mixed lengths (one length for the reducers with training losses of the whole pass)
    batch = tokens(name, counts=[20, 20] if reducer in ("dynamicvit", "mctf") else [24, 11, 17])
    assert parameters_without_gradient(_Logits(model), batch) == []


def test_transformers_checkpointing_gives_the_same_gradients():
    import copy

    model = tokenreduce.apply(make("BertForSequenceClassification"), "mctf", **SETTINGS["mctf"]).train()
    twin = copy.deepcopy(model)
    twin.activation_checkpointing_enable()
    assert twin.bert.encoder.layer[0].gradient_checkpointing
    batch = tokens("BertForSequenceClassification", counts=[20, 20])
    for m in (model, twin):
        torch.manual_seed(0)
        m(**batch).logits.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- pooling ------------------------------------------------------------------------------------------
def test_mean_pool_is_the_mean_over_input_tokens_of_their_merged_tokens():
    """Brute force through the source map: every real input token counts once, with the value of the token
    it merged into; on a model without reduction, the plain masked mean."""
    model = make("BertModel")
    batch = tokens("BertModel")
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        want = torch.stack([plain[b, : int(mask[b].sum())].mean(0) for b in range(len(mask))])
        torch.testing.assert_close(hf_text.mean_pool(model, plain, mask), want, rtol=1e-6, atol=1e-6)
        tokenreduce.apply(model, "tome", r=0)
        same = model(**batch).last_hidden_state
        torch.testing.assert_close(hf_text.mean_pool(model, same, mask), want, rtol=1e-5, atol=1e-6)
        tokenreduce.apply(model, "tome", r=4, trace_source=True)
        hidden = model(**batch).last_hidden_state
    source = tokenreduce.stats(model)["source"]
    for b, count in enumerate(COUNTS):
        total = torch.zeros(hidden.shape[-1])
        for token in range(count):
            total += hidden[b, source[b, token]]
        expected = total / count
        for m in (mask, hf_text.reduced_mask(model), None):
            torch.testing.assert_close(hf_text.mean_pool(model, hidden, m)[b], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="not the output of the model's last pass"):
        hf_text.mean_pool(model, plain, mask)


# --- cost ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CLASSES)
def test_analytic_macs_equal_flop_counter(name, attn):
    model = make(name, attn)
    batch = unpadded(name, batch=2, length=20)
    for reducer, params in [("none", {}), ("tome", {"r": 4})]:
        tokenreduce.apply(model, reducer, **params)
        flops = counted_flops(model, **batch)
        assert tokenreduce.stats(model)["macs"] * 2 * 2 == flops, reducer


@pytest.mark.parametrize("reducer", ["tome", "mctf", "evit", "pitome"])
def test_padding_costs_nothing(reducer):
    """The FLOPs of a padded batch are the sum of its sequences' MACs."""
    model = tokenreduce.apply(make("BertForSequenceClassification", "sdpa"), reducer, **SETTINGS[reducer])
    flops = counted_flops(model, **tokens("BertForSequenceClassification"))
    stats = tokenreduce.stats(model)
    assert sum(g["macs"] * len(g["images"]) for g in stats["groups"]) * 2 == flops


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForTokenClassification", "RobertaForTokenClassification",
                                  "DistilBertForMaskedLM", "BertForMultipleChoice"])
def test_an_unsupported_class_names_itself_and_the_supported_ones(name):
    family = name.split("For")[0].lower()
    torch.manual_seed(0)
    model = getattr(transformers, name)(CONFIGS[family]())
    with pytest.raises(ConfigError) as err:
        tokenreduce.apply(model, "tome", r=2)
    message = str(err.value)
    assert name in message and all(supported in message for supported in hf_text.SUPPORTED)
    if name != "BertForMultipleChoice":
        assert "token-level head" in message and "needs every token" in message
    assert adapter_for(model).name == "hf_text" and not hasattr(model, "_tokenreduce")


def test_a_decoder_and_other_attention_implementations_are_refused():
    with pytest.raises(UnsupportedModelError, match="decoder"):
        tokenreduce.apply(make("BertModel", is_decoder=True), "tome", r=2)
    check_flash_attention_refused(make("RobertaModel"))


def _left_padded():
    batch = tokens("BertModel", counts=[24, 10])
    return {**batch, "attention_mask": batch["attention_mask"].flip(1)}


@pytest.mark.parametrize("kwargs, words", [
    ({"output_hidden_states": True}, "output_hidden_states=True is not supported"),
    ({"output_attentions": True}, "output_attentions=True is not supported"),
    ({"encoder_hidden_states": torch.zeros(2, 3, 32)}, "encoder_hidden_states not supported"),
    ({"inputs_embeds": torch.zeros(2, 24, 32)}, "exactly one of input_ids and inputs_embeds"),
    ({"attention_mask": "left"}, "padding before real tokens.*padding_side='right'"),
    ({"attention_mask": "one token"}, "a sequence with 1 real tokens; allowed: at least 2"),
])
def test_refused_arguments_are_named_before_any_compute(kwargs, words):
    model = tokenreduce.apply(make("BertModel"), "tome", r=2)
    calls = []
    model.embeddings.register_forward_hook(lambda *a: calls.append(1))
    batch = tokens("BertModel", counts=[24, 10])
    if kwargs.get("attention_mask") == "left":
        kwargs = {"attention_mask": _left_padded()["attention_mask"]}
    elif kwargs.get("attention_mask") == "one token":
        kwargs = {"attention_mask": tokens("BertModel", counts=[24, 1])["attention_mask"]}
    with pytest.raises(ConfigError, match=words):
        model(**{**batch, **kwargs})
    assert not calls
