"""fmnist_vlm, the Fashion-MNIST vision-language model: the timm -> CLIP conversion of its tower, the
tokenizer, processor and chat template, the question sets, the training module and task=train_vlm end
to end on tiny settings, the reducers of the three placements on it, and the refusals. CPU, seconds."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import cli

transformers = pytest.importorskip("transformers")

import tokenreduce  # noqa: E402
from tokenreduce.data.fashion_mnist import DEBIAN_ROOT, FILES, ShapeImages  # noqa: E402
from tokenreduce.engine.tasks.train_vlm import VLMModule, VLMOptim  # noqa: E402
from tokenreduce.errors import ConfigError  # noqa: E402
from tokenreduce.models import fmnist_vlm as V  # noqa: E402

needs_data = pytest.mark.skipif(not Path(DEBIAN_ROOT, FILES["test"][0]).is_file(),
                                reason=f"Fashion-MNIST is not installed in {DEBIAN_ROOT} "
                                       "(apt-get install dataset-fashion-mnist)")
# the answers written out by hand, apart from the module's tables
WORDS = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
YES_FOR = {"is this footwear?": {"sandal", "sneaker", "boot"},
           "is this worn on the upper body?": {"tshirt", "pullover", "dress", "coat", "shirt"},
           "is this clothing?": {"tshirt", "trouser", "pullover", "dress", "coat", "shirt"},
           "is this for carrying things?": {"bag"}}


def expected_answer(question: str, label: int) -> str:
    word = WORDS[label]
    if question == "what is this item?":
        return word
    if question in YES_FOR:
        return "yes" if word in YES_FOR[question] else "no"
    assert question.startswith("is this a ") and question.endswith("?")
    return "yes" if question[len("is this a "):-1] == word else "no"


@pytest.fixture(scope="module")
def processor():
    return V.fmnist_vlm_processor()


@pytest.fixture(scope="module")
def encoder(processor):
    return V.QuestionEncoder(processor)


def random_model(seed: int = 0):
    torch.manual_seed(seed)
    return V.create_fmnist_vlm(vision="random").eval()


def grey_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def pils(images: torch.Tensor, mode: str = "L"):
    from PIL import Image

    return [Image.fromarray(im.numpy(), mode="L").convert(mode) for im in images]


# --- architecture and conversion ---------------------------------------------------------------------
def test_architecture_is_the_documented_one():
    model = random_model()
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.image_size, vision.patch_size, vision.num_channels, vision.hidden_size) == (32, 4, 1, 128)
    assert (vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size) == (8, 4, 512)
    assert vision.hidden_act == "gelu" and vision.layer_norm_eps == 1e-6
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (128, 4, 4, 344)
    assert text.vocab_size == len(V.VOCAB) and text.max_position_embeddings == 256
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert model.config.image_token_id == V.IMAGE_ID
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied
    params = sum(p.numel() for p in model.parameters())
    assert params * 4 < 12e6  # float32 weights under 12 MB
    assert len(V.weights_state(model)) == len(model.state_dict()) - 1  # the tied copy is not saved


def test_conversion_gives_fmnist_vits_tokens_with_the_pre_layernorm_bypassed():
    import timm

    import tokenreduce.models  # noqa: F401  (registers fmnist_vit)

    vit = timm.create_model("fmnist_vit", pretrained=True).eval()
    torch.manual_seed(0)
    tower = V.create_fmnist_vlm().model.vision_tower.eval()
    pre = tower.pre_layrnorm
    assert torch.equal(pre.weight, torch.ones(128)) and torch.equal(pre.bias, torch.zeros(128))
    x = ShapeImages((1, 32, 32), V.FMNIST_MEAN, V.FMNIST_STD, "pad")(grey_images(6))
    with torch.no_grad():
        tokens = vit._pos_embed(vit.patch_embed(x))
        reference = [tokens]
        for block in vit.blocks:
            tokens = block(tokens)
            reference.append(tokens)
        tower.pre_layrnorm = torch.nn.Identity()
        out = tower(x, output_hidden_states=True)
        for layer, (a, b) in enumerate(zip(reference, out.hidden_states, strict=True)):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5, msg=f"layer {layer}")
        # timm's final norm is CLIP's post-layernorm: the CLS through fmnist_vit's head gives its logits
        torch.testing.assert_close(vit.head(out.pooler_output), vit(x), atol=2e-5, rtol=1e-5)
        tower.pre_layrnorm = pre
        assert not torch.allclose(tower(x).last_hidden_state, out.last_hidden_state, atol=1e-3)  # it is not the identity


def test_conversion_folds_the_patch_bias_and_splits_qkv():
    state = {"cls_token": torch.randn(1, 1, 8), "pos_embed": torch.randn(1, 5, 8),
             "patch_embed.proj.weight": torch.randn(8, 1, 2, 2), "patch_embed.proj.bias": torch.randn(8),
             "norm.weight": torch.randn(8), "norm.bias": torch.randn(8),
             "blocks.0.attn.qkv.weight": torch.randn(24, 8), "blocks.0.attn.qkv.bias": torch.randn(24)}
    for name, shape in [("attn.proj", (8, 8)), ("norm1", None), ("norm2", None), ("mlp.fc1", (16, 8)),
                        ("mlp.fc2", (8, 16))]:
        state[f"blocks.0.{name}.weight"] = torch.randn(shape or (8,))
        state[f"blocks.0.{name}.bias"] = torch.randn(shape[0] if shape else 8)
    out = V.vit_to_clip(state)
    position = out["embeddings.position_embedding.weight"]
    assert torch.equal(position[0], state["pos_embed"][0, 0])
    assert torch.equal(position[1:], state["pos_embed"][0, 1:] + state["patch_embed.proj.bias"])
    qkv = state["blocks.0.attn.qkv.weight"]
    assert torch.equal(out["encoder.layers.0.self_attn.q_proj.weight"], qkv[:8])
    assert torch.equal(out["encoder.layers.0.self_attn.k_proj.weight"], qkv[8:16])
    assert torch.equal(out["encoder.layers.0.self_attn.v_proj.bias"], state["blocks.0.attn.qkv.bias"][16:])
    assert torch.equal(out["embeddings.class_embedding"], state["cls_token"].flatten())
    with pytest.raises(ConfigError, match="lacks cls_token"):
        V.vit_to_clip({k: v for k, v in state.items() if k != "cls_token"})


# --- text --------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_the_vocabulary(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == len(V.VOCAB) and tokenizer.padding_side == "left"
    for index, word in enumerate(V.VOCAB):
        assert tokenizer.convert_tokens_to_ids(word) == index
        if word not in V.SPECIAL_TOKENS:
            assert tokenizer(word)["input_ids"] == [V.BOS_ID, index]  # <s> in front, one id per word
            assert tokenizer.decode([index]) == word
    text = "is this worn on the upper body?"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "is this worn on the upper body ?"
    assert tokenizer("a hat?")["input_ids"] == [V.BOS_ID, V.VOCAB.index("a"), V.UNK_ID, V.VOCAB.index("?")]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (V.PAD_ID, V.BOS_ID, V.EOS_ID)
    assert tokenizer.image_token_id == V.IMAGE_ID


def test_chat_template_is_llava_15s_form(processor):
    assert processor.apply_chat_template(V.conversation("what is this item?"), add_generation_prompt=True) == \
        "USER: <image>\nwhat is this item? ASSISTANT:"
    assert processor.apply_chat_template(V.conversation(V.user_text("is this a bag?", True), "no")) == \
        "USER: <image>\nis this a bag?\nAnswer the question using a single word or phrase. ASSISTANT: no</s>"
    plain_text = [{"role": "user", "content": "is this clothing?"}]
    assert processor.apply_chat_template(plain_text, add_generation_prompt=True) == "USER: is this clothing? ASSISTANT:"


def test_processor_expands_the_image_and_gives_fmnist_vits_pixels(processor, encoder):
    import timm
    from timm.data import create_transform, resolve_data_config

    import tokenreduce.models  # noqa: F401

    images = grey_images(3, seed=1)
    expected = ShapeImages((1, 32, 32), V.FMNIST_MEAN, V.FMNIST_STD, "pad")(images)
    vit = timm.create_model("fmnist_vit", pretrained=False)
    timm_pipeline = create_transform(**resolve_data_config({}, model=vit))
    torch.testing.assert_close(torch.stack([timm_pipeline(p) for p in pils(images)]), expected, atol=0, rtol=0)
    texts = [processor.apply_chat_template(V.conversation(q), add_generation_prompt=True)
             for q in ("what is this item?", "is this worn on the upper body?", V.user_text("is this a coat?", True))]
    for mode in ("L", "RGB"):  # a grey image made RGB (as task=vqa opens images) comes back the same
        out = processor(images=pils(images, mode), text=texts, padding=True, return_tensors="pt")
        assert out["pixel_values"].shape == (3, 1, 32, 32) and torch.equal(out["pixel_values"], expected)
        assert ((out["input_ids"] == V.IMAGE_ID).sum(1) == 64).all()
        # the training batches' ids are the processor's
        mine = encoder.encode(["what is this item?", "is this worn on the upper body?", V.user_text("is this a coat?", True)])
        assert torch.equal(out["input_ids"], mine["input_ids"])
        assert torch.equal(out["attention_mask"], mine["attention_mask"])
    single = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": pils(images[:1])[0]},
                                      {"type": "text", "text": "what is this item?"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert single["input_ids"][0].tolist() == encoder.prompt_ids("what is this item?")
    assert torch.equal(single["pixel_values"], expected[:1])


def test_encoder_marks_only_the_answer_and_numbers_positions_as_generate(encoder):
    batch = encoder.encode(["what is this item?", V.user_text("is this footwear?", True)], ["coat", "no"])
    ids, mask, labels, positions = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]
    assert ids[0, 0] == V.PAD_ID and mask[0, 0] == 0 and mask[1].all()  # left padding of the shorter one
    kept = labels != -100
    assert kept.sum(1).tolist() == [2, 2] and kept[:, -2:].all()  # the answer word and </s>, nothing else
    assert labels[0, -2:].tolist() == [V.VOCAB.index("coat"), V.EOS_ID]
    assert labels[1, -2:].tolist() == [V.VOCAB.index("no"), V.EOS_ID]
    assert torch.equal(ids[kept], labels[kept])
    assert positions[1].tolist() == list(range(ids.shape[1]))
    real = int(mask[0].sum())
    assert positions[0, -real:].tolist() == list(range(real)) and (positions[0, :-real] == 1).all()


def test_the_loss_counts_only_the_answer_tokens(encoder):
    batch = encoder.encode(["what is this item?", "is this a bag?"], ["dress", "yes"])
    labels = batch["labels"]
    logits = torch.randn(*labels.shape, len(V.VOCAB), generator=torch.Generator().manual_seed(0))
    loss = VLMModule.answer_loss(logits, labels)
    width = labels.shape[1]
    by_hand = torch.stack([torch.nn.functional.cross_entropy(logits[b, t - 1], labels[b, t])
                           for b in range(2) for t in (width - 2, width - 1)]).mean()
    torch.testing.assert_close(loss, by_hand)
    changed = logits.clone()
    changed[:, : width - 3] = torch.randn(2, width - 3, len(V.VOCAB))  # the prompt's predictions do not count
    torch.testing.assert_close(VLMModule.answer_loss(changed, labels), loss)


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_training_steps_lower_the_loss(encoder):
    torch.manual_seed(0)
    model = V.create_fmnist_vlm(vision="random", text_layers=2)  # two layers: the same code, half the time
    module = VLMModule(model, VLMOptim(lr=3e-3, weight_decay=0.05, warmup_steps=0, vision_lr_scale=0.5))
    batch = encoder.encode(["what is this item?", "is this a bag?", "is this footwear?", "what is this item?"],
                           ["coat", "yes", "no", "boot"])
    batch["pixel_values"] = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    optimizer = module.configure_optimizers()["optimizer"]
    lrs = sorted({group["lr"] for group in optimizer.param_groups})
    assert lrs == pytest.approx([1.5e-3, 3e-3])  # the tower at vision_lr_scale
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}  # matrices only
    module.train()
    with torch.no_grad():
        before = module.answer_loss(module.forward_logits(batch), batch["labels"]).item()
    for _ in range(12):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = module.answer_loss(module.forward_logits(batch), batch["labels"]).item()
    assert after < 0.5 * before


# --- questions ---------------------------------------------------------------------------------------
def test_questions_are_answered_right_and_balanced():
    rng = random.Random(0)
    yes = Counter()
    for _ in range(2000):
        label = rng.randrange(10)
        for kind in V.KINDS:
            question, reply = V.ask(kind, label, rng)
            assert reply == expected_answer(question, label) == V.true_answer(question, label)
            yes[kind] += reply == "yes"
    assert yes["what"] == 0 and 900 < yes["is_class"] < 1100 and 900 < yes["category"] < 1100
    for label in range(10):  # every class can be asked either answer of each yes/no kind
        for kind in ("is_class", "category"):
            for want in (True, False):
                assert V.ask(kind, label, rng, yes=want)[1] == ("yes" if want else "no")


@needs_data
def test_question_writer(tmp_path):
    from PIL import Image

    from tokenreduce.data.fashion_mnist import load_split

    path = V.write_fmnist_questions(tmp_path / "a" / "fmnist_vqa.jsonl", images=25, seed=3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 75 and [x["question_id"] for x in lines] == list(range(75))
    pixels, labels = load_split(DEBIAN_ROOT, "test")
    kinds = Counter(x["question_type"] for x in lines)
    assert kinds == {"what": 25, "is_class": 25, "category": 25}
    for kind in ("is_class", "category"):
        assert sum(x["answer"] == "yes" for x in lines if x["question_type"] == kind) == 13  # half, rounded up
    indices = [x["image_index"] for x in lines[::3]]
    assert len(set(indices)) == 25
    assert sorted(Counter(int(labels[i]) for i in indices).values()) == [2] * 5 + [3] * 5  # even over the classes
    for x in lines:
        assert x["label"] == int(labels[x["image_index"]])
        assert x["answer"] == expected_answer(x["question"], x["label"]) and x["answers"] == [x["answer"]] * 10
        image = path.parent / x["image"]
        assert torch.equal(torch.from_numpy(__import__("numpy").array(Image.open(image))), pixels[x["image_index"]])
    again = V.write_fmnist_questions(tmp_path / "b" / "fmnist_vqa.jsonl", images=25, seed=3)
    assert again.read_text() == path.read_text()  # deterministic per seed (the image paths are relative)
    other = V.write_fmnist_questions(tmp_path / "c.jsonl", images=25, seed=4)
    assert other.read_text() != path.read_text()
    only = V.write_fmnist_questions(tmp_path / "d.jsonl", images=4, seed=0, kinds=["category"])
    assert [json.loads(x)["question_type"] for x in only.read_text().splitlines()] == ["category"] * 4
    with pytest.raises(ConfigError, match="already exists"):
        V.write_fmnist_questions(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=0), "images=0 is invalid"), (dict(images=10_001), "images=10001 is invalid"),
    (dict(seed=-1), "seed=-1 is invalid"), (dict(kinds=["how"]), r"kinds=\['how'\] is invalid"),
    (dict(kinds=[]), r"kinds=\[\] is invalid"), (dict(kinds="what"), "kinds='what' is invalid"),
    (dict(kinds=["what", "what"]), r"kinds=\['what', 'what'\] is invalid; allowed: a list of distinct kinds"),
])
def test_question_writer_refuses_bad_settings(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        V.write_fmnist_questions(tmp_path / "q.jsonl", **kwargs)
    assert not list(tmp_path.iterdir())


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: V.model_config(width=3), "width=3 is not a setting; allowed: text_hidden_size"),
    (lambda: V.model_config(text_layers=0), "text_layers=0 is invalid; allowed: an integer >= 1"),
    (lambda: V.model_config(text_heads=3), "text_heads=3 is invalid for text_hidden_size=128"),
    (lambda: V.model_config(max_positions=40), "max_positions=40 is invalid; allowed: an integer >= 89"),
    (lambda: V.model_config(vision_feature_layer=-9), r"vision_feature_layer=-9 is invalid; allowed: .*-8..-1"),
    (lambda: V.model_config(vision_feature_layer=0), "vision_feature_layer=0 is invalid"),
    (lambda: V.create_fmnist_vlm(vision="clip"), "vision='clip' is invalid; allowed: fmnist_vit, random"),
    (lambda: V.ask("how", 0, random), "kind='how' is invalid; allowed: what, is_class, category"),
    (lambda: V.true_answer("is this a hat?", 0), "question='is this a hat[?]' is not one of"),
    (lambda: V.load_fmnist_vlm("/nonexistent.safetensors"), "weights='/nonexistent.safetensors' is not a file"),
    (lambda: VLMOptim(vision_lr_scale=-1), "vlm.optim: vision_lr_scale=-1 is invalid"),
    (lambda: VLMOptim(lr=0), "vlm.optim: lr=0 is invalid"),
    (lambda: VLMOptim(decay="step"), "vlm.optim.decay='step' is invalid; allowed: constant, cosine"),
])
def test_refusals(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_weights_of_another_vocabulary_are_refused(tmp_path):
    from tokenreduce.engine.step_training import save_state_dict

    model = random_model()
    meta = V.weights_metadata(V.model_config())
    save_state_dict(V.weights_state(model), tmp_path / "ok.safetensors", meta)
    loaded = V.load_fmnist_vlm(tmp_path / "ok.safetensors")
    for (name, a), b in zip(V.weights_state(model).items(), V.weights_state(loaded).values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    save_state_dict(V.weights_state(model), tmp_path / "other.safetensors",
                    {**meta, V.VOCAB_KEY: json.dumps(list(V.VOCAB[:-1]))})
    with pytest.raises(ConfigError, match="another vocabulary"):
        V.load_fmnist_vlm(tmp_path / "other.safetensors")


# --- the reducers on it ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, check", [
    ("fastv", dict(layer=2, keep=0.5), lambda s: s["visual_tokens"] == [64, 64, 32, 32]),
    ("visionzip", dict(dominant=27, contextual=5), lambda s: s["visual_per_image"] == [32, 32]),
    ("pitome", dict(ratio=0.9), lambda s: s["tower"]["feature_tokens"] < 65 and s["visual_per_image"][0] < 64),
])
def test_reducers_run_on_the_architecture_with_generate(encoder, name, params, check):
    model = random_model()
    pixels = ShapeImages((1, 32, 32), V.FMNIST_MEAN, V.FMNIST_STD, "pad")(grey_images(2, seed=2))
    questions = ["what is this item?", V.user_text("is this a coat?", True)]
    plain = V.answer(model, encoder, pixels, questions)
    tokenreduce.apply(model, name, **params)
    try:
        reduced = V.answer(model, encoder, pixels, questions)
        assert len(reduced) == 2 and all(isinstance(r, str) for r in reduced)
        assert check(tokenreduce.stats(model)), tokenreduce.stats(model)
    finally:
        tokenreduce.remove(model)
    assert V.answer(model, encoder, pixels, questions) == plain


# --- task=train_vlm ----------------------------------------------------------------------------------
SMALL = ["experiment=train_fmnist_vlm", "trainer.max_steps=2", "trainer.accelerator=cpu",
         "trainer.precision=32-true", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
         "data.batch_size=4", "data.eval_batch_size=6", "data.val_size=8", "vlm.eval_images=2",
         "vlm.optim.warmup_steps=1"]


@needs_data
def test_experiment_runs_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli(monkeypatch, *SMALL, f"hydra.run.dir={tmp_path}")
    record = json.loads((tmp_path / "vlm.json").read_text())
    assert record["global_step"] == 2 and record["val_loss"] > 0 and 0 <= record["val_accuracy"] <= 1
    assert record["val_step"] == 2
    generated = record["generation"]
    assert generated["questions"] == 6 and set(generated["by_kind"]) == set(V.KINDS)
    assert set(generated["plain"]) == set(generated["instructed"]) == set(V.KINDS)  # every other image
    assert record["checkpoints"]["last"] and record["checkpoints"]["best"]
    assert record["model"] == V.CONFIG and record["vision"] == "fmnist_vit"
    # the weights written at the end are the last checkpoint's
    shipped = V.load_fmnist_vlm(tmp_path / record["weights"])
    last = V.load_fmnist_vlm(record["checkpoints"]["last"])
    for (name, a), b in zip(V.weights_state(shipped).items(), V.weights_state(last).values(), strict=True):
        assert torch.equal(a, b), name


@needs_data
def test_experiment_resumes_from_its_last_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli(monkeypatch, *SMALL, f"hydra.run.dir={tmp_path / 'first'}")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and saved[V.VOCAB_KEY] == list(V.VOCAB)
    cli(monkeypatch, *SMALL, "trainer.max_steps=3", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'second'}")
    record = json.loads((tmp_path / "second" / "vlm.json").read_text())
    assert record["global_step"] == 3  # one more step, not three from the start


@needs_data
@pytest.mark.parametrize("override, match", [
    ("+vlm.lr=1", "vlm.lr is not a setting"),
    ("+vlm.optim.momentum=1", "vlm.optim.momentum is not a setting"),
    ("vlm.optim.lr=-1", "lr=-1 is invalid"),
    ("vlm.optim.vision_lr_scale=-1", "vision_lr_scale=-1 is invalid"),
    ("vlm.model.text_layers=0", "text_layers=0 is invalid"),
    ("vlm.model.vision_feature_layer=-9", "vision_feature_layer=-9 is invalid"),
    ("vlm.vision=clip", "vlm.vision='clip' is invalid; allowed: fmnist_vit, random"),
    ("vlm.instructed=2", "instructed=2 is invalid"),
    ("vlm.eval_images=9", "eval_images=9 is invalid"),
    ("checkpoint.monitor=val/top1", "checkpoint.monitor='val/top1'"),
    ("data.scaling=resize", "data.scaling='resize' is invalid for task=train_vlm"),
    ("data.root=/nonexistent", "data.root=/nonexistent"),
    ("optim.lr=1", "optim.lr=1 is not used by task=train_vlm"),
])
def test_experiment_refuses_bad_settings(monkeypatch, tmp_path, capsys, override, match):
    with pytest.raises(SystemExit) as err:
        cli(monkeypatch, *SMALL, override, f"hydra.run.dir={tmp_path}")
    assert err.value.code == 2  # a ConfigError, said in one line
    assert match in capsys.readouterr().err
    assert not (tmp_path / "vlm.json").exists()


@pytest.mark.skipif(not V.WEIGHTS.is_file(), reason="the trained fmnist_vlm weights are not shipped yet")
@needs_data
def test_shipped_weights_answer_test_questions(tmp_path, encoder):
    from PIL import Image

    model = V.load_fmnist_vlm()
    path = V.write_fmnist_questions(tmp_path / "q.jsonl", images=60, seed=0)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    processor = encoder.processor
    pixels = processor.image_processor(images=[Image.open(tmp_path / x["image"]) for x in lines],
                                       return_tensors="pt")["pixel_values"]
    replies = V.answer(model, encoder, pixels, [x["question"] for x in lines])
    right = Counter(x["question_type"] for x, r in zip(lines, replies, strict=True) if r == x["answer"])
    assert right["what"] >= 0.75 * 60 and right["is_class"] >= 0.8 * 60 and right["category"] >= 0.8 * 60
