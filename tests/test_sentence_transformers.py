"""The sentence-transformers adapter: a SentenceTransformer (Transformer holding a tiny random BertModel,
then Pooling, with and without Normalize) is its unreduced self when nothing is removed, for every pooling
mode; with merging each mode is the brute-force pooling of each sentence's reduced tokens run alone
(mean: their size-weighted mean); token embeddings, stats, remove; refusals with the reason, among them
a BertModel reduced on its own inside a SentenceTransformer."""

import pytest
import torch
from hf_checks import check_missing_transformers_refused

import tokenreduce
from tokenreduce.errors import ConfigError, UnclaimedModelError, UnsupportedModelError

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")
modules = pytest.importorskip("sentence_transformers.sentence_transformer.modules")

WORDS = [f"w{i}" for i in range(60)]
# 20, 7, 12 and 1 words: padded batches that mix real lengths (22, 9, 14 and 3 tokens with [CLS], [SEP])
TEXTS = [" ".join(WORDS[i:i + n]) for i, n in [(0, 20), (5, 7), (30, 12), (2, 1)]]
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken", "weightedmean")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random BertModel (4 layers, 32 channels) and a word-level tokenizer, saved as transformers does."""
    path = tmp_path_factory.mktemp("bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=5 + len(WORDS), max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(path)
    return str(path)


def make(folder, mode="mean", normalize=False, include_prompt=True):
    transformer = modules.Transformer(folder)
    pooling = modules.Pooling(transformer.get_embedding_dimension(), mode, include_prompt=include_prompt)
    parts = [transformer, pooling] + ([modules.Normalize()] if normalize else [])
    return st.SentenceTransformer(modules=parts, device="cpu").eval()


def encode(model, texts=TEXTS, **kwargs):
    return model.encode(texts, convert_to_tensor=True, batch_size=len(texts), **kwargs)


@pytest.mark.parametrize(("mode", "normalize"), [(MODES, False), ("mean", True)])
def test_zero_reduction_is_the_unreduced_model(folder, mode, normalize):
    model = make(folder, mode, normalize)
    expected = encode(model)
    tokenreduce.apply(model, "tome", r=0, trace_source=mode == MODES)  # weightedmean reads the source map
    assert torch.allclose(encode(model), expected, atol=1e-5)
    assert tokenreduce.stats(model)["tokens"] == [22] * 5  # the widest sequence, nothing removed


def reference(model, text: str) -> dict[str, torch.Tensor]:
    """Each mode pooled by hand over the tokens the reduced BertModel gives `text` alone."""
    bert = model[0].auto_model
    features = model.preprocess([text])
    inputs = {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    hidden = bert(**inputs).last_hidden_state[0]
    sizes = bert._tokenreduce.last_state.sizes[0, :, 0]
    assert hidden.shape[0] == len(sizes) and bool((sizes > 0).all())  # alone: no padding
    total = sum(size * token for size, token in zip(sizes, hidden, strict=True))
    pooled = {"cls": hidden[0], "max": hidden.max(dim=0).values, "mean": total / sizes.sum(),
              "mean_sqrt_len_tokens": total / inputs["attention_mask"].sum().float().sqrt(), "lasttoken": hidden[-1]}
    source = tokenreduce.stats(bert)["source"]
    if source is not None:  # weightedmean: an input token at position i (from 1) counts i times with its token
        weights = torch.arange(1, source.shape[1] + 1, dtype=torch.float32)
        pooled["weightedmean"] = sum(w * hidden[s] for w, s in zip(weights, source[0].tolist(), strict=True)) / \
            weights.sum()
    return pooled


def test_reduced_embeddings_are_the_pooled_reduced_tokens(folder):
    model = make(folder, MODES)
    tokenreduce.apply(model, "tome", r=3, trace_source=True)
    got = encode(model)
    assert tokenreduce.stats(model)["tokens"] == [22, 19, 16, 13, 10]
    largest = []
    for text, embedding in zip(TEXTS, got, strict=True):
        expected = reference(model, text)
        for mode, part in zip(MODES, embedding.split(32), strict=True):
            torch.testing.assert_close(part, expected[mode], atol=1e-5, rtol=1e-5, msg=mode)
        largest.append(int(model[0].auto_model._tokenreduce.last_state.sizes.max()))
    assert largest[0] > 1 and largest[2] > 1  # merged tokens: the sizes weigh


def test_normalized_mean_is_the_normalized_size_weighted_mean(folder):
    model = make(folder, normalize=True)
    tokenreduce.apply(model, "tome", r=3)
    got = encode(model)
    expected = torch.stack([torch.nn.functional.normalize(reference(model, t)["mean"], dim=0) for t in TEXTS])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mean_norms_do_not_shrink_with_padding(folder):
    # a short sentence batched with long ones: its embedding is the one it gets alone
    model = make(folder)
    tokenreduce.apply(model, "tome", r=3)
    alone = encode(model, [TEXTS[3]])
    batched = encode(model)[3]
    torch.testing.assert_close(batched, alone[0], atol=1e-5, rtol=1e-5)


def test_token_embeddings_are_each_sentences_reduced_tokens(folder):
    model = make(folder)
    tokenreduce.apply(model, "tome", r=3)
    tokens = model.encode(TEXTS, output_value="token_embeddings", batch_size=len(TEXTS))
    bert = model[0].auto_model
    for text, got in zip(TEXTS, tokens, strict=True):
        features = model.preprocess([text])
        hidden = bert(**{k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
        torch.testing.assert_close(got, hidden.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    assert [len(t) for t in tokens] == [10, 3, 4, 3]  # 22, 9, 14, 3 tokens less 3 per layer, at least 2


def test_the_callers_features_keep_the_input_mask(folder):
    model = make(folder)
    tokenreduce.apply(model, "tome", r=3)
    features = model.preprocess(TEXTS)
    mask = features["attention_mask"].clone()
    out = model(features)
    assert torch.equal(features["attention_mask"], mask)  # they may be cut into parts and run again
    assert out["attention_mask"].tolist() == [[1] * 10, [1] * 3 + [0] * 7, [1] * 4 + [0] * 6, [1] * 3 + [0] * 7]


def test_stats_remove_and_reapply(folder):
    model = make(folder)
    expected = encode(model)
    keys = set(model.state_dict())
    classes = (type(model), type(model[0].auto_model), type(model[1]))
    tokenreduce.apply(model, "tome", r=2)
    encode(model)
    stats = tokenreduce.stats(model)
    assert stats["reducer"] == "tome" and stats["macs"] == tokenreduce.stats(model[0].auto_model)["macs"]
    assert tokenreduce.reducer_of(model) is model[0].auto_model.token_reducer
    tokenreduce.apply(model, "tome", r=3)  # replaces the reducer
    encode(model)
    assert tokenreduce.stats(model)["tokens"] == [22, 19, 16, 13, 10]
    tokenreduce.remove(model)
    assert (type(model), type(model[0].auto_model), type(model[1])) == classes
    assert set(model.state_dict()) == keys
    assert "_tr_pipeline" not in model[0].auto_model.__dict__ and "_tr_pipeline" not in model[1].__dict__
    assert torch.allclose(encode(model), expected, atol=1e-6)


# --- refusals -------------------------------------------------------------------------------------
def test_weightedmean_without_a_source_map_is_refused_before_any_compute(folder):
    model = make(folder, ("mean", "weightedmean"))
    tokenreduce.apply(model, "tome", r=2)
    with pytest.raises(ConfigError, match=r"pooling_mode 'weightedmean' .*allowed: a reducer built with "
                                          r"trace_source=True"):
        encode(model)
    assert model[0].auto_model._tokenreduce.last_state is None


def test_a_prompt_left_out_of_pooling_is_refused(folder):
    model = make(folder, include_prompt=False)
    tokenreduce.apply(model, "tome", r=2)
    with pytest.raises(ConfigError, match=r"include_prompt=False with a prompt \(prompt_length=2\)"):
        encode(model, prompt="w1 ")
    encode(model)  # without a prompt it pools every token


def test_a_bert_reduced_on_its_own_inside_a_sentence_transformer_is_refused(folder):
    model = make(folder)
    tokenreduce.apply(model[0].auto_model, "tome", r=2)
    with pytest.raises(ConfigError, match=r"BertModel that carries a reducer of its own is run by a "
                                          r"sentence-transformers Transformer module.*allowed: the reducer applied "
                                          r"to the SentenceTransformer itself"):
        encode(model)
    with pytest.raises(UnsupportedModelError, match=r"already carries a reducer; call tokenreduce.remove"):
        tokenreduce.apply(model, "tome", r=2)
    assert not hasattr(model, "_tokenreduce")
    tokenreduce.remove(model[0].auto_model)
    tokenreduce.apply(model, "tome", r=2)
    encode(model)


def test_the_bert_of_a_reduced_sentence_transformer_is_changed_through_it_only(folder):
    model = make(folder)
    tokenreduce.apply(model, "tome", r=2)
    bert = model[0].auto_model
    for change in (lambda: tokenreduce.remove(bert), lambda: tokenreduce.apply(bert, "tome", r=3)):
        with pytest.raises(ConfigError, match="is the transformers model of a token-reduced SentenceTransformer"):
            change()
    assert bert.token_reducer.params()["r"] == 2 and tokenreduce.reducer_of(model) is bert.token_reducer


def test_missing_sentence_transformers_is_refused(folder, monkeypatch):
    check_missing_transformers_refused(make(folder), ["sentence_transformers.sentence_transformer.modules"],
                                       monkeypatch)


def test_unsupported_layouts_are_refused(folder):
    model = make(folder)
    with pytest.raises(UnclaimedModelError, match=r"Pooling is not supported by the sentence-transformers "
                                                  r"adapter; supported: SentenceTransformer"):
        tokenreduce.apply(model[1], "tome", r=2)
    without_pooling = st.SentenceTransformer(modules=[model[0]], device="cpu")
    with pytest.raises(UnsupportedModelError, match=r"has the modules \['Transformer'\]; supported: a Transformer "
                                                    r"module holding"):
        tokenreduce.apply(without_pooling, "tome", r=2)
    assert not hasattr(without_pooling, "_tokenreduce")
