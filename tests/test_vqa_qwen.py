"""task=vqa on a Qwen2.5-VL (engine/tasks/vqa.py, docs/vlm.md): a tiny random Qwen2_5_VLForConditionalGeneration
with its processor (word-level tokenizer, Qwen's image processor: images of any size cut into 2x2-merged
4-pixel patches, 3-D rotary positions) saved as a local folder answers questions unreduced and with the
language-model reducers; the visual tokens, MACs and answers are the model's own."""

from __future__ import annotations

import json

import pytest
import torch
from test_vqa import run_vqa, save_vqa_folder, word_level_tokenizer

import tokenreduce
from tokenreduce.core.visual_tokens import dart_keep_count
from tokenreduce.engine.config import compose

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("clean_hydra", "one_thread")

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>",
         "USER", "ASSISTANT", ":", "?", "what", "is", "the", "color", "of", "shirt", "yes", "no", "red", "blue"]
VOCAB = WORDS + [f"w{i}" for i in range(64 - len(WORDS))]
TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
            "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
SIDE = 32  # pixels: Qwen's resize keeps a 32x32 image, 8x8 patches of 4 pixels, 16 visual tokens
SHAPES = [(SIDE, SIDE), (SIDE, SIDE), (SIDE, SIDE), (40, 24)]  # the last: 12x8 patches, 24 visual tokens
VISUAL = [16, 16, 16, 24]
QUESTIONS = [("what is the color of the shirt ?", ["red"] * 10), ("is the shirt blue ?", ["no"] * 10),
             ("color ?", ["blue"] * 10), ("what is the shirt", ["shirt"] * 10)]
REDUCERS = ("vqa.reducers=[{name: fastv, layer: 2, keep: 0.25}, {name: pyramiddrop, layers: [1, 3], ratio: 0.5}, "
            "{name: dart, layer: 2, budget: 8, image_pivots: 1, text_pivots: 1}, "
            "{name: sparsevlm, layers: [1, 3], scale: 0.0, bias: [8, 4]}]")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_qwen")
    tokenizer = word_level_tokenizer(VOCAB, image_token="<|image_pad|>", video_token="<|video_pad|>",
                                     vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    patches = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE, **patches),
        video_processor=transformers.Qwen2VLVideoProcessor(**patches), tokenizer=tokenizer, chat_template=TEMPLATE)
    torch.manual_seed(0)
    vision = transformers.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                                 out_hidden_size=32, patch_size=4, window_size=16, fullatt_block_indexes=[1])
    text = transformers.Qwen2_5_VLTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(VOCAB), max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
    ids = {name: VOCAB.index(token) for name, token in (("image_token_id", "<|image_pad|>"),
                                                        ("video_token_id", "<|video_pad|>"),
                                                        ("vision_start_token_id", "<|vision_start|>"),
                                                        ("vision_end_token_id", "<|vision_end|>"))}
    config = transformers.Qwen2_5_VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **ids)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    items = [(question, answers, {"question_id": i}) for i, (question, answers) in enumerate(QUESTIONS)]
    return save_vqa_folder(root, model, processor, items, lambda i: SHAPES[i])


@pytest.fixture(scope="module")
def record(tiny_qwen, tmp_path_factory):
    return run_vqa(tmp_path_factory.mktemp("run") / "run", *tiny_qwen, REDUCERS, "vqa.batch_size=2")


def mean(values) -> float:
    return sum(values) / len(values)


def test_every_reducer_in_the_language_model_runs_on_qwen(record):
    """Per sample, averaged over the questions; the last batch holds images of 16 and 24 visual tokens,
    each kept by its own count."""
    rows = record["rows"]
    assert [r["reducer"] for r in rows] == ["none", "fastv", "pyramiddrop", "dart", "sparsevlm"]
    none, fastv, pyramid, dart, sparse = rows
    assert none["visual_tokens"] == none["visual_tokens_layer_mean"] == mean(VISUAL)
    assert fastv["visual_tokens"] == mean([v // 4 for v in VISUAL])
    assert fastv["visual_tokens_layer_mean"] == pytest.approx(mean([(2 * v + 3 * (v // 4)) / 5 for v in VISUAL]))
    assert pyramid["visual_tokens"] == mean([v // 4 for v in VISUAL])
    assert pyramid["visual_tokens_layer_mean"] == pytest.approx(mean([(v + 2 * (v // 2) + 2 * (v // 4)) / 5
                                                                      for v in VISUAL]))
    assert dart["visual_tokens"] == dart_keep_count(8, 1, 1)
    assert sparse["visual_tokens"] < sparse["visual_tokens_layer_mean"] < mean(VISUAL)
    parts = none["prefill_macs_parts"]
    assert parts["vision_tower"] > 0 and parts["projector"] > 0
    for row in rows[1:]:
        assert row["prefill_macs"] < none["prefill_macs"] and row["kv_cache_bytes"] < none["kv_cache_bytes"]
        assert row["prefill_macs_parts"]["vision_tower"] == parts["vision_tower"]  # the tower runs whole
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and row["ttft_ms"] > 0


def test_answers_do_not_depend_on_the_batch(tiny_qwen, tmp_path, record):
    alone = run_vqa(tmp_path / "one", *tiny_qwen, REDUCERS, "vqa.batch_size=1")
    for a, b in zip(alone["answers"], record["answers"], strict=True):
        assert a["predictions"] == b["predictions"]


def test_the_answers_are_the_models_own_greedy_generation(tiny_qwen, record):
    from PIL import Image

    folder, questions = tiny_qwen
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    line = json.loads(questions.read_text().splitlines()[0])
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": record["settings"]["prompt"].format(question=line["question"])}]}],
        add_generation_prompt=True, tokenize=False)
    with Image.open(questions.parent / line["image"]) as image:
        inputs = processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")
    tokenreduce.apply(model, "fastv", layer=2, keep=0.25)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=3, suppress_tokens=[VOCAB.index("<|image_pad|>")])
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert record["answers"][0]["predictions"][1] == answer


def test_the_qwen_experiment_runs_the_language_model_reducers():
    cfg = compose(["experiment=vqa_qwen25vl_3b_gqa"])
    names = {entry["name"] for entry in cfg.vqa.reducers}
    assert names == {"fastv", "pyramiddrop", "dart", "sparsevlm"}
    for entry in cfg.vqa.reducers:
        params = {k: v for k, v in entry.items() if k != "name"}
        tokenreduce.create_reducer(entry["name"], **params)  # each setting is valid
