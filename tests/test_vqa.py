"""task=vqa (engine/tasks/vqa.py, docs/vlm.md): a tiny random LLaVA with a word-level tokenizer, saved as a
local folder, answers a few questions about PNG images, unreduced and with reducers in the language model,
at the boundary and in the tower; the VQAv2 accuracy rule and normaliser by hand; the question files and
their converters; the refusals, all before a model is loaded."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

import tokenreduce
from tokenreduce.engine.config import compose
from tokenreduce.engine.run import run
from tokenreduce.engine.tasks import vqa
from tokenreduce.engine.tasks.vqa import exact_match, normalize_answer, vqa_accuracy
from tokenreduce.engine.vqa_data import convert, main, read_questions
from tokenreduce.errors import ConfigError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("clean_hydra", "one_thread")

IMAGE_TOKENS = 16  # (16 / 4)^2 patches, CLS dropped
WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER", "ASSISTANT", ":", "?", "what", "is", "the", "color",
         "of", "shirt", "yes", "no", "red", "blue", "two", "2", "a", "how", "many", "are", "there", "answer",
         "question", "using", "single", "word", "or", "phrase", "."]
VOCAB = WORDS + [f"w{i}" for i in range(64 - len(WORDS))]  # the model's 64 ids, each a word
IMAGE_ID = VOCAB.index("<image>")
TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QUESTIONS = [  # prompts of different lengths: the batches are left-padded
    ("what is the color of the shirt ?", ["red"] * 3 + ["blue"] * 7),
    ("is there a shirt ?", ["yes"] * 10),
    ("how many are there ?", ["two"] * 4 + ["2"] * 4 + ["w3"] * 2),
    ("color ?", ["blue"] * 10),
    ("what is a shirt", ["no"] * 9 + ["yes"]),
]


def word_level_tokenizer(vocab: list[str], **special: str):
    """A tokenizer that splits on spaces and punctuation, one id per word of `vocab` (its first four:
    padding, unknown, start, end), with the processor's `special` tokens (e.g. image_token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[1]))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token=vocab[0], unk_token=vocab[1],
                                                bos_token=vocab[2], eos_token=vocab[3], extra_special_tokens=special)


def save_vqa_folder(root, model, processor, items, shape):
    """`model` and `processor` saved in root/model, a random PNG image per item (question, answers, and
    the line's other fields) of `shape(i)` pixels in root/images, and root/questions.jsonl."""
    from PIL import Image

    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "images").mkdir()
    generator = torch.Generator().manual_seed(3)
    lines = []
    for i, (question, answers, fields) in enumerate(items):
        pixels = (torch.rand(*shape(i), 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        lines.append({"image": f"images/{i}.png", "question": question, "answers": answers, **fields})
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "model", questions


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A random LlavaForConditionalGeneration and its LlavaProcessor (word-level tokenizer, CLIP image
    processor, chat template) saved as a local folder, PNG images and a question file beside them."""
    root = tmp_path_factory.mktemp("vqa")
    tokenizer = word_level_tokenizer(VOCAB, image_token="<image>")
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                                            vision_feature_select_strategy="default", chat_template=TEMPLATE,
                                            num_additional_image_tokens=1)
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=4, projection_dim=32)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=256,
                                    pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = transformers.LlavaForConditionalGeneration(config).eval()
    items = [(question, answers, {"question_id": 100 + i, "question_type": "color" if "color" in question else "other"})
             for i, (question, answers) in enumerate(QUESTIONS)]
    return save_vqa_folder(root, model, processor, items, lambda i: (20 + 2 * i, 24))


def overrides(model, questions, *extra: str) -> list[str]:
    return ["task=vqa", f"vqa.model={model}", f"vqa.questions={questions}", "vqa.max_new_tokens=3",
            "vqa.metric=vqa", "measure.device=cpu", "vqa.reducers=[]", *extra]


def run_vqa(out, model, questions, *extra: str) -> dict:
    args = overrides(model, questions, *extra)
    run(compose(args), out, overrides=args)
    return json.loads((out / "vqa.json").read_text())


REDUCERS = ("vqa.reducers=[{name: fastv, layer: 2, keep: 0.25}, {name: visionzip, dominant: 4, contextual: 2}, "
            "{name: tome, r: 2}]")


@pytest.fixture(scope="module")
def record(tiny_vlm, tmp_path_factory):
    """One run with the unreduced model, fastv (language model), visionzip (boundary), tome (tower)."""
    out = tmp_path_factory.mktemp("run") / "run"
    return out, run_vqa(out, *tiny_vlm, REDUCERS, "vqa.batch_size=2")


# --- the task -----------------------------------------------------------------------------------------
def test_the_table_has_every_setting_with_the_reducers_visual_tokens(record):
    out, written = record
    rows = written["rows"]
    assert [r["reducer"] for r in rows] == ["none", "fastv", "visionzip", "tome"]
    none, fastv, visionzip, tome = rows
    assert none["visual_tokens"] == none["visual_tokens_layer_mean"] == IMAGE_TOKENS
    assert fastv["visual_tokens"] == 4  # round(16 * 0.25) from layer 2 of 5 on
    assert fastv["visual_tokens_layer_mean"] == pytest.approx((2 * 16 + 3 * 4) / 5)
    assert visionzip["visual_tokens"] == visionzip["visual_tokens_layer_mean"] == 6  # 4 dominant + 2 contextual
    assert tome["visual_tokens"] == IMAGE_TOKENS - 2  # one tower layer merged 2
    for part in ("vision_tower", "blocks"):  # the tower's own MACs shrink under tome, the decoder's under all
        assert tome["prefill_macs_parts"][part] < none["prefill_macs_parts"][part]
    assert sum(none["prefill_macs_parts"].values()) == pytest.approx(none["prefill_macs"])
    assert none["mac_fraction"] == 1.0 and none["prefill_speedup"] == 1.0
    for row in rows[1:]:
        assert row["mac_fraction"] < 1 and row["prefill_macs"] < none["prefill_macs"]
        assert row["kv_cache_bytes"] < none["kv_cache_bytes"]  # fewer tokens, fewer cache entries
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and row["ttft_ms"] > 0 and row["prefill_speedup"] > 0
        assert len(row["ttft_seconds_per_batch"]) == 3  # 5 questions in batches of 2
        assert set(row["accuracy_by_type"]) == {"color", "other"}
    table = (out / "vqa.md").read_text()
    assert table.count("\n| ") == 1 + 4 and "| fastv | layer=2, keep=0.25 |" in table
    assert written["settings"]["batch_size"] == 2 and written["count"] == 5


def test_the_cache_bytes_are_every_layers_keys_and_values(record):
    """The unreduced cache: 5 layers x (keys + values) x 2 heads x 8 dims x float32 x the padded prompt."""
    _, written = record
    none, fastv = written["rows"][:2]
    per_position = 5 * 2 * 2 * 8 * 4
    assert none["kv_cache_bytes"] % per_position == 0
    # fastv drops 12 image tokens from the cache of layers 2, 3, 4
    assert none["kv_cache_bytes"] - fastv["kv_cache_bytes"] == 12 * 3 / 5 * per_position


def test_answers_and_scores_per_question(record):
    _, written = record
    answers = written["answers"]
    assert [a["question_id"] for a in answers] == [100, 101, 102, 103, 104]
    for item in answers:
        assert len(item["predictions"]) == len(item["scores"]) == 4
        assert item["scores"] == [vqa_accuracy(p, item["answers"]) for p in item["predictions"]]
    for i, row in enumerate(written["rows"]):
        assert row["accuracy"] == pytest.approx(sum(a["scores"][i] for a in answers) / 5)


def test_answers_do_not_depend_on_the_batch(tiny_vlm, tmp_path, record):
    """The unreduced answers, each prompt alone and left-padded in batches of 3, are the same."""
    alone = run_vqa(tmp_path / "one", *tiny_vlm, "vqa.batch_size=1")
    batched = run_vqa(tmp_path / "three", *tiny_vlm, "vqa.batch_size=3")
    predictions = [[a["predictions"][0] for a in r["answers"]] for r in (alone, batched, record[1])]
    assert predictions[0] == predictions[1] == predictions[2]
    assert any(p for p in predictions[0])  # the tiny model says something


def test_the_answers_are_the_models_own_greedy_generation(tiny_vlm, record):
    """The first question by hand: the chat template, the image, greedy decoding."""
    from PIL import Image

    folder, questions = tiny_vlm
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    question = read_questions(questions)[0]
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": vqa.DEFAULT_PROMPT.format(question=question.question)}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.open(question.image).convert("RGB")], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == IMAGE_TOKENS
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_ID], pad_token_id=0)
    expected = processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert record[1]["answers"][0]["predictions"][0] == expected


def test_the_command_line_prints_the_table_and_every_reducer_is_removed(tiny_vlm, tmp_path, monkeypatch, capsys):
    from conftest import cli

    from tokenreduce.engine.tasks.vqa import Setting

    applied = []
    original = Setting.placed

    def watched(self, model):
        applied.append(model)
        return original(self, model)

    monkeypatch.setattr(Setting, "placed", watched)
    out = tmp_path / "run"
    cli(monkeypatch, *overrides(*tiny_vlm, "vqa.limit=2", "vqa.metric=exact",
                                "vqa.reducers=[{name: prumerge, neighbours: 4}]"), f"hydra.run.dir={out}")
    printed = capsys.readouterr().out
    assert "| reducer | params | accuracy | visual tokens |" in printed and "| prumerge | neighbours=4 |" in printed
    assert (out / "vqa.md").is_file() and json.loads((out / "vqa.json").read_text())["count"] == 2
    assert applied and all(tokenreduce.reducer_of(m) is None for m in applied)


def test_a_model_tokenreduce_does_not_claim_runs_unreduced_with_its_placeholder_count(tiny_vlm, tmp_path,
                                                                                      monkeypatch):
    """Where no adapter claims the model, the unreduced row counts the placeholders and has no
    MACs; a reducer on such a model is refused before any question is asked."""
    def unclaimed(model, reducer, **params):
        raise tokenreduce.errors.UnclaimedModelError("no adapter claims this model")

    monkeypatch.setattr(vqa.tokenreduce, "apply", unclaimed)
    written = run_vqa(tmp_path / "a", *tiny_vlm, "vqa.limit=2")
    none = written["rows"][0]
    assert none["visual_tokens"] == IMAGE_TOKENS and none["prefill_macs"] is None and none["mac_fraction"] is None
    with pytest.raises(ConfigError, match="no adapter claims"):
        run_vqa(tmp_path / "b", *tiny_vlm, "vqa.limit=2", "vqa.reducers=[{name: fastv}]")
    assert not (tmp_path / "b" / "vqa.json").exists()


def test_the_own_model_writes_its_question_set_into_the_run_directory(tiny_vlm, tmp_path, monkeypatch):
    """vqa.model=fmnist_vlm with no question file: the model, processor and question writer come from
    tokenreduce.models.fmnist_vlm (a stand-in here, with the names vqa.load_named_model calls)."""
    import tokenreduce.models

    folder, questions = tiny_vlm

    def write(path):
        lines = [json.loads(line) for line in questions.read_text().splitlines()]
        path.write_text("".join(json.dumps({**line, "image": str(questions.parent / line["image"])}) + "\n"
                                for line in lines))
        return path

    own = types.SimpleNamespace(
        load_fmnist_vlm=lambda: transformers.AutoModelForImageTextToText.from_pretrained(folder),
        fmnist_vlm_processor=lambda: transformers.AutoProcessor.from_pretrained(folder), write_fmnist_questions=write)
    monkeypatch.setitem(sys.modules, "tokenreduce.models.fmnist_vlm", own)
    monkeypatch.setattr(tokenreduce.models, "fmnist_vlm", own, raising=False)
    args = ["task=vqa", "vqa.model=fmnist_vlm", "vqa.questions=null", "vqa.limit=2", "vqa.max_new_tokens=2",
            "measure.device=cpu", "vqa.reducers=[{name: fastv, keep: 0.5}]"]
    out = tmp_path / "run"
    run(compose(args), out, overrides=args)
    written = json.loads((out / "vqa.json").read_text())
    assert written["questions_file"] == str(out / "questions.jsonl") and written["count"] == 2
    assert [r["visual_tokens"] for r in written["rows"]] == [IMAGE_TOKENS, IMAGE_TOKENS // 2]


# --- the experiments -----------------------------------------------------------------------------------
EXPERIMENTS = {"vqa_llava15_7b_gqa": "exact", "vqa_llava15_7b_textvqa": "vqa", "vqa_llava15_7b_pope": "exact",
               "vqa_qwen25vl_3b_gqa": "exact", "vqa_qwen25vl_3b_textvqa": "vqa", "vqa_qwen25vl_3b_pope": "exact"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_experiments_are_checked_up_to_their_question_file(name, tmp_path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)  # no data/vqa/ here
    cfg = compose([f"experiment={name}"])
    assert cfg.task == "vqa" and cfg.vqa.metric == EXPERIMENTS[name]
    assert len(cfg.vqa.reducers) == (8 if "qwen" in name else 14)
    with pytest.raises(ConfigError, match=re.escape(f"vqa.questions='{cfg.vqa.questions}' is not a file")):
        run(cfg, tmp_path / "run")


def test_the_llava_experiments_keep_192_128_and_64_visual_tokens():
    """On LLaVA-1.5-7B's 576 image tokens and 32 layers, the counts the experiment's comments state."""
    cfg = compose(["experiment=vqa_llava15_7b_gqa"])
    kept: dict[str, list[float]] = {}
    for entry in OmegaConf.to_container(cfg.vqa.reducers):
        name = entry.pop("name")
        reducer = tokenreduce.create_reducer(name, **entry)
        if name == "visionzip":
            count = entry["dominant"] + entry["contextual"]
        elif name == "pyramiddrop":  # averaged over the 32 layers
            counts = reducer.visual_counts(576)
            bounds = [*entry["layers"], 32]
            stages = zip(bounds, bounds[1:], counts, strict=False)
            count = (bounds[0] * 576 + sum((b - a) * c for a, b, c in stages)) / 32
        elif name in ("fastv", "dart"):
            count = reducer.visual_counts(576)[0]
        else:
            continue  # PruMerge's count is the image's own
        kept.setdefault(name, []).append(count)
    assert kept["fastv"] == kept["visionzip"] == [192, 128, 64]
    assert kept["pyramiddrop"] == pytest.approx([192, 127.625, 63.6875])
    assert kept["dart"] == [196, 132, 68]  # the reference's 4 + 8 * (budget // 8)


# --- refusals, before any model is loaded ---------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(vqa, "load_model", lambda *a, **k: pytest.fail("loaded a model"))


def write_lines(path, *lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("extra, match", [
    (["vqa.metric=bleu"], "vqa.metric='bleu' is invalid; allowed: vqa, exact"),
    (["vqa.limit=0"], "vqa: limit=0 is invalid; allowed: an integer >= 1"),
    (["vqa.batch_size=0"], "batch_size=0 is invalid"),
    (["vqa.max_new_tokens=0"], "max_new_tokens=0 is invalid"),
    (["vqa.dtype=int8"], "vqa.dtype='int8' is invalid; allowed: auto, float32"),
    (["vqa.prompt=no question here"], "holding {question}"),
    (["vqa.prompt='{question} {other}'"], "whose only field is {question}"),
    (["vqa.reducers=[{name: nosuch}]"], "vqa.reducers[0]:"),
    (["vqa.reducers=[{name: fastv, keep: 2}]"], "keep=2 is invalid"),
    (["+vqa.nosuch=1"], "vqa.nosuch is not a setting"),
    (["reducer=tome"], "reducer=tome is not used by task=vqa"),
    (["+vqa.match={tokens: [8], methods: [{name: prumerge}]}"], "prumerge has no strength to set"),
    (["+vqa.match={tokens: [0], methods: [{name: fastv}]}"], "tokens=0 is invalid"),
    (["+vqa.match={tokens: [8], measure: median, methods: [{name: fastv}]}"], "measure='median' is invalid"),
    (["+vqa.match={tokens: [8], methods: [{name: fastv, keep: 0.5}]}"], "keep=0.5 is the parameter being searched"),
    (["+vqa.match={tokens: [8]}"], "vqa.match={'tokens': [8]} is invalid"),
])
def test_bad_settings_are_refused_before_the_model_loads(tiny_vlm, tmp_path, no_loading, extra, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        run_vqa(tmp_path / "run", *tiny_vlm, *extra)
    assert not (tmp_path / "run").exists()


def test_matched_settings_keep_the_visual_tokens_asked_for(tiny_vlm, tmp_path):
    written = run_vqa(tmp_path / "run", *tiny_vlm, "vqa.limit=2",
                      "vqa.match={tokens: [8, 4], methods: [{name: fastv, layer: 2}, {name: visionzip, contextual: 2}]}")
    rows = written["rows"]
    assert [(r["reducer"], r["visual_tokens"]) for r in rows] == [
        ("none", IMAGE_TOKENS), ("fastv", 8), ("visionzip", 8), ("fastv", 4), ("visionzip", 4)]
    assert rows[2]["params"]["contextual"] == 2 and rows[2]["params"]["dominant"] == 6


def test_bad_question_files_are_refused_with_their_line(tiny_vlm, tmp_path, no_loading):
    model, good = tiny_vlm
    image = str(good.parent / "images" / "0.png")
    line = {"image": image, "question": "what ?", "answers": ["a", "b"]}
    cases = [
        (str(tmp_path / "missing.jsonl"), "missing.jsonl' is not a file"),
        (write_lines(tmp_path / "keys.jsonl", line, "", {"image": image, "question": "q"}),
         "line 3: no answers; allowed: an object with image, question, answers"),
        (write_lines(tmp_path / "json.jsonl", line, "{not json"), "line 2: not JSON"),
        (write_lines(tmp_path / "answers.jsonl", {**line, "answers": "yes"}), "line 1: answers='yes' is invalid"),
        (write_lines(tmp_path / "image.jsonl", line, {**line, "image": "nowhere.png"}),
         "line 2: image '" + str(tmp_path / "nowhere.png") + "' is not a file"),
        (write_lines(tmp_path / "one.jsonl", line, {**line, "answers": ["yes"]}),
         "vqa.metric=vqa needs at least 2 answers per question"),
        (write_lines(tmp_path / "empty.jsonl", ""), "holds no questions"),
    ]
    for path, match in cases:
        with pytest.raises(ConfigError, match=re.escape(match)):
            run_vqa(tmp_path / "run", model, path)
    # a single-answer set is fine for exact match, and lines after the limit are not read
    assert len(read_questions(write_lines(tmp_path / "limit.jsonl", line, line, "{not json"), limit=2)) == 2


def test_a_hub_model_needs_a_question_file(tmp_path, no_loading):
    with pytest.raises(ConfigError, match="vqa.questions=None is invalid with vqa.model=some/model"):
        run(compose(["task=vqa", "vqa.model=some/model"]), tmp_path / "run")


def test_nothing_already_written_is_overwritten(tiny_vlm, tmp_path, no_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / "vqa.md").write_text("earlier")
    with pytest.raises(ConfigError, match="vqa.md already exists"):
        run_vqa(out, *tiny_vlm)
    assert (out / "vqa.md").read_text() == "earlier" and not (out / "vqa.json").exists()


def test_a_model_that_cannot_be_loaded_is_named(tiny_vlm, tmp_path):
    (tmp_path / "empty").mkdir()  # a local folder without a model: no hub look-up
    with pytest.raises(ConfigError, match="vqa.model=.*empty.* cannot be loaded"):
        run_vqa(tmp_path / "run", tmp_path / "empty", tiny_vlm[1])


# --- the accuracy rule --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, normal", [
    ("Yes", "yes"), ("Two", "2"), ("the red shirt.", "red shirt"), ("a dog", "dog"), ("An apple!", "apple"),
    ("3.5", "3.5"), ("1,000", "1000"), ("black-and-white", "black and white"), ("dont", "don't"),
    ("It isnt", "it isn't"), ("couldnt've", "couldn't've"), ("its", "its"), ("  red\n shirt ", "red shirt"),
    ("(left)", "left"), ("yes, it is", "yes it is"), ("none", "0"), ("ten cats", "10 cats"),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize("matches, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_over_the_ten_leave_one_out_subsets(matches, accuracy):
    """With m of 10 annotators matching: leaving a matching one out (m subsets) scores min((m-1)/3, 1),
    leaving another out (10 - m) scores min(m/3, 1); 3 matches so give (3 * 2/3 + 7) / 10 = 0.9."""
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("Cat.", answers) == pytest.approx(accuracy)


def test_vqa_accuracy_normalises_the_annotators_too():
    assert vqa_accuracy("2", ["two", "Two", "2 ", "2."] + ["4"] * 6) == pytest.approx(1.0)  # four match
    with pytest.raises(ValueError):
        vqa_accuracy("yes", ["yes"])


def test_exact_match():
    assert exact_match("Yes.", ["yes"]) == 1.0
    assert exact_match("no", ["yes"]) == 0.0
    assert exact_match("The Table", ["chair", "table"]) == 1.0
    assert exact_match("two", ["2"]) == 1.0


# --- converters -------------------------------------------------------------------------------------------
def test_converters_write_our_lines_from_the_official_formats(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("n1.jpg", "abc.jpg", "COCO_val2014_000000000042.jpg"):
        (images / name).write_bytes(b"")
    gqa = {"201": {"imageId": "n1", "question": "Is it red?", "answer": "no",
                   "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}}}
    textvqa = {"dataset_name": "textvqa", "data": [{"question_id": 7, "image_id": "abc", "question": "what brand?",
                                                    "answers": ["nokia"] * 10, "image_classes": ["phone"]}]}
    pope = [{"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog in the image?",
             "label": "yes", "category": "random"}]
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    (tmp_path / "textvqa.json").write_text(json.dumps(textvqa))
    (tmp_path / "pope.json").write_text("".join(json.dumps(line) + "\n" for line in pope))  # POPE: JSON lines
    out = tmp_path / "data" / "vqa"
    convert("gqa", tmp_path / "gqa.json", images, out / "gqa.jsonl")
    convert("textvqa", tmp_path / "textvqa.json", images, out / "textvqa.jsonl")
    assert main(["pope", str(tmp_path / "pope.json"), str(images), str(out / "pope.jsonl")]) == 0
    lines = {kind: json.loads((out / f"{kind}.jsonl").read_text()) for kind in ("gqa", "textvqa", "pope")}
    assert lines["gqa"] == {"image": "../../images/n1.jpg", "question": "Is it red?", "answers": ["no"],
                            "question_id": "201", "question_type": "verify"}
    assert lines["textvqa"] == {"image": "../../images/abc.jpg", "question": "what brand?",
                                "answers": ["nokia"] * 10, "question_id": 7}
    assert lines["pope"]["answers"] == ["yes"] and lines["pope"]["question_type"] == "random"
    for kind in lines:  # what the task reads: the images found beside the file
        (question,) = read_questions(out / f"{kind}.jsonl")
        assert question.image.resolve().parent == images.resolve()
    with pytest.raises(ConfigError, match="already exists"):  # never written over
        convert("gqa", tmp_path / "gqa.json", images, out / "gqa.jsonl")
    with pytest.raises(ConfigError, match="not an official textvqa question file"):
        convert("textvqa", tmp_path / "gqa.json", images, out / "other.jsonl")
    assert main(["gqa", str(tmp_path / "none.json"), str(images), str(out / "x.jsonl")]) == 2
