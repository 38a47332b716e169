"""The transformers evaluation tasks (engine/hf_tasks.py) and their data readers (data/hf_sets.py):
metrics against brute-force references, the readers on hand-made files, and each task end to end on
tiny random models saved with their processors."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from tokenreduce.data import hf_sets
from tokenreduce.engine import hf_tasks
from tokenreduce.engine.config import compose
from tokenreduce.engine.run import run
from tokenreduce.errors import ConfigError

transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "cat", "dog", "bird", "the", "on", "grass", "red", "blue", "car", "is", "good", "bad",
         "film", "very", "not"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TEXT = {**SHAPE, "vocab_size": len(VOCAB), "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
        "max_position_embeddings": 64}
VISION = {**SHAPE, "image_size": 32, "patch_size": 8}


# --- metrics against brute force ------------------------------------------------------------------------
def brute_recall(similarity, image_of, k):
    images, texts = similarity.shape
    i2t = 0
    for i in range(images):
        own = [t for t in range(texts) if image_of[t] == i]
        best = min(sum(1 for u in range(texts) if similarity[i, u] > similarity[i, t]) for t in own)
        i2t += best < k
    t2i = 0
    for t in range(texts):
        i = image_of[t]
        t2i += sum(1 for j in range(images) if similarity[j, t] > similarity[i, t]) < k
    return i2t / images, t2i / texts


@pytest.mark.parametrize("seed", range(4))
def test_recall_at_k_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    images = 7
    image_of = torch.cat([torch.arange(images), torch.randint(0, images, (13,), generator=gen)])
    similarity = torch.randn(images, len(image_of), generator=gen)
    similarity = (similarity * 2).round() / 2  # ties
    result = hf_tasks.recall_at_k(similarity, image_of, ks=(1, 2, 5))
    for k in (1, 2, 5):
        i2t, t2i = brute_recall(similarity, image_of.tolist(), k)
        assert result[f"i2t_r{k}"] == pytest.approx(i2t)
        assert result[f"t2i_r{k}"] == pytest.approx(t2i)
    assert result["rsum"] == pytest.approx(sum(v for key, v in result.items() if key != "rsum"))


def test_recall_hand_fixture():
    # image 0 has texts 0, 1; image 1 has text 2
    similarity = torch.tensor([[0.1, 0.9, 0.5],
                               [0.8, 0.2, 0.3]])
    result = hf_tasks.recall_at_k(similarity, torch.tensor([0, 0, 1]), ks=(1, 2))
    # image 0: its text 1 is best (rank 0); image 1: its text 2 is behind text 0 (rank 1)
    assert result["i2t_r1"] == 0.5 and result["i2t_r2"] == 1
    # text 0: image 1 scores higher (miss at 1); text 1: found; text 2: image 0 higher (miss at 1)
    assert result["t2i_r1"] == pytest.approx(1 / 3) and result["t2i_r2"] == 1


def test_topk_accuracy_and_map_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(40, 7, generator=gen), torch.randint(0, 7, (40,), generator=gen)
    for k in (1, 5):
        expected = np.mean([labels[i].item() in logits[i].argsort(descending=True)[:k].tolist() for i in range(40)])
        assert hf_tasks.topk_accuracy(logits, labels, k) == pytest.approx(expected)
    assert hf_tasks.topk_accuracy(logits[:, :3], labels % 3, 5) is None

    scores = torch.rand(30, 5, generator=gen)
    targets = (torch.rand(30, 5, generator=gen) < 0.3).long()
    targets[:, 4] = 0  # a class with no positive is left out
    aps = []
    for c in range(4):
        order = scores[:, c].argsort(descending=True)
        hits = targets[order, c]
        precisions = [hits[: i + 1].float().mean().item() for i in range(len(hits)) if hits[i]]
        aps.append(np.mean(precisions))
    assert hf_tasks.mean_average_precision(scores, targets) == pytest.approx(np.mean(aps), abs=1e-6)


# --- the readers -----------------------------------------------------------------------------------------
def write_image(path, seed=0, size=(40, 36)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def karpathy_layout(root, images=4, captions=2):
    entries = []
    for i in range(images + 2):
        split = "test" if i < images else "train"
        folder = "val2014" if i % 2 else ""
        write_image(root / folder / f"{i}.jpg", seed=i)
        entry = {"filename": f"{i}.jpg", "split": split,
                 "sentences": [{"raw": f" {WORDS[(i + j) % 12]} photo of a {WORDS[3 + (i + j) % 3]} "}
                               for j in range(captions)]}
        if folder:
            entry["filepath"] = folder
        entries.append(entry)
    annotations = root / "dataset.json"
    annotations.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return annotations


def test_read_karpathy(tmp_path):
    annotations = karpathy_layout(tmp_path)
    data = hf_sets.read_karpathy(tmp_path, annotations, "test")
    assert [p.name for p in data.images] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert data.images[1] == tmp_path / "val2014" / "1.jpg"
    assert data.image_of == [0, 0, 1, 1, 2, 2, 3, 3] and data.captions_of[2] == [4, 5]
    assert data.captions[0] == "a photo of a cat"
    assert len(hf_sets.read_karpathy(tmp_path, annotations, "test", limit=3).images) == 3
    with pytest.raises(ConfigError, match="has no image in split 'val'"):
        hf_sets.read_karpathy(tmp_path, annotations, "val")
    with pytest.raises(ConfigError, match="data.split='dev' is invalid; allowed: train, restval, val, test"):
        hf_sets.read_karpathy(tmp_path, annotations, "dev")
    (tmp_path / "2.jpg").unlink()
    with pytest.raises(ConfigError, match="2.jpg.*does not exist"):
        hf_sets.read_karpathy(tmp_path, annotations, "test")
    with pytest.raises(ConfigError, match="data.annotations=.*nothing.json: no such file"):
        hf_sets.read_karpathy(tmp_path, tmp_path / "nothing.json")


def test_read_texts_formats_and_labels(tmp_path):
    csv_file = tmp_path / "set.csv"
    csv_file.write_text('text,label\n"a good film",positive\nbad,negative\n"not, good",0\n')
    data = hf_sets.read_texts(csv_file, class_names=["negative", "positive"])
    assert data.items == ["a good film", "bad", "not, good"] and data.labels == [1, 0, 0]
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text('{"sentence": "good", "y": 1}\n\n{"sentence": "bad", "y": 3}\n')
    data = hf_sets.read_texts(jsonl, "sentence", "y")
    assert data.labels == [1, 3] and data.class_names == ["0", "1", "2", "3"]
    tsv = tmp_path / "set.tsv"
    tsv.write_text("text\tlabel\tx\nred car\tb\t1\nblue\ta\t2\n")
    data = hf_sets.read_texts(tsv)
    assert data.labels == [1, 0] and data.class_names == ["a", "b"]
    with pytest.raises(ConfigError, match="data.text_field='sentence' is not a field of row 1.*allowed: text, label"):
        hf_sets.read_texts(csv_file, text_field="sentence")
    with pytest.raises(ConfigError, match="label 'positive' is not one of the model's 2 classes; allowed: LABEL_0"):
        hf_sets.read_texts(csv_file, class_names=["LABEL_0", "LABEL_1"])
    with pytest.raises(ConfigError, match="suffix '.txt'; allowed: .csv, .tsv, .jsonl"):
        (tmp_path / "x.txt").write_text("a")
        hf_sets.read_texts(tmp_path / "x.txt")


def test_read_image_classes(tmp_path):
    for k, name in enumerate(["golden_retriever", "cat"]):
        for i in range(3):
            write_image(tmp_path / name / f"{i}.png", seed=k * 3 + i)
    data = hf_sets.read_image_classes(tmp_path)
    assert data.class_names == ["cat", "golden retriever"] and data.labels == [0, 0, 0, 1, 1, 1]
    names = tmp_path.parent / "names.txt"
    names.write_text("kitten\n\nretriever\n")
    assert hf_sets.read_image_classes(tmp_path, str(names)).class_names == ["kitten", "retriever"]
    spread = hf_sets.read_image_classes(tmp_path, limit=2)
    assert spread.labels == [0, 1]
    with pytest.raises(ConfigError, match="3 names for 2 class folders"):
        hf_sets.read_image_classes(tmp_path, ["a", "b", "c"])


def write_wav(path, samples, rate=16000, width=2, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    if width == 1:
        data = (np.asarray(samples) * 127 + 128).astype(kind)
    else:
        data = (np.asarray(samples) * (np.iinfo(kind).max)).astype(kind)
    data = np.repeat(data[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(data.tobytes())
    return path


@pytest.mark.parametrize("width", [1, 2, 4])
def test_load_wav(tmp_path, width):
    samples = np.sin(np.linspace(0, 20, 800)) * 0.5
    path = write_wav(tmp_path / "a.wav", samples, width=width, channels=2)
    loaded = hf_sets.load_wav(path, 16000)
    assert loaded.dtype == np.float32 and loaded.shape == (800,)
    assert np.abs(loaded - samples).max() < (0.02 if width == 1 else 1e-4)
    with pytest.raises(ConfigError, match="sampled at 16000 Hz; allowed: 8000 Hz"):
        hf_sets.load_wav(path, 8000)


def test_read_clips_and_frames(tmp_path):
    for clip in range(3):
        for frame in range(5 + clip):
            write_image(tmp_path / f"clip{clip}" / f"{frame:03d}.jpg", seed=frame)
    index = tmp_path / "index.csv"
    index.write_text("path,label\nclip0,jump\nclip1,run\nclip2,1\n")
    data = hf_sets.read_clips("video", tmp_path, index, ["jump", "run"])
    assert data.labels == [0, 1, 1] and not data.multilabel
    frames = hf_sets.load_frames(tmp_path / "clip1", 3)
    assert len(frames) == 3 and frames[0].size == (40, 36)
    assert len(hf_sets.load_frames(tmp_path / "clip0", 8)) == 8  # a short clip repeats frames
    multi = tmp_path / "multi.csv"
    multi.write_text("path,label\nclip0,jump;run\nclip1,run\n")
    data = hf_sets.read_clips("video", tmp_path, multi, ["jump", "run"])
    assert data.multilabel and data.labels == [[0, 1], [1]]
    with pytest.raises(ConfigError, match="row 1 .* has 2 labels; allowed: one per clip"):
        hf_sets.read_clips("video", tmp_path, multi, ["jump", "run"], multilabel=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nclip9,jump\n")
    with pytest.raises(ConfigError, match="clip9.*is not a folder of frames"):
        hf_sets.read_clips("video", tmp_path, bad, ["jump"])


# --- tasks end to end on tiny saved models ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def save(model, processor, folder):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """Tiny random models with their processors, saved as a user's local folders."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    image = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    folders = {
        "clip": save(transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                                     projection_dim=16)),
                     transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(**image),
                                                tokenizer=tokenizer), root / "clip"),
        "siglip": save(transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)),
                       transformers.SiglipProcessor(image_processor=transformers.SiglipImageProcessor(
                           size={"height": 32, "width": 32}), tokenizer=tokenizer), root / "siglip"),
        "bert": save(transformers.BertForSequenceClassification(transformers.BertConfig(
            **SHAPE, vocab_size=len(VOCAB), num_labels=2, id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1})), tokenizer, root / "bert"),
        "video": save(transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(
            **SHAPE, image_size=32, patch_size=8, num_frames=4, tubelet_size=2, num_labels=3)),
            transformers.VideoMAEImageProcessor(**image), root / "video"),
        "ast": save(transformers.ASTForAudioClassification(transformers.ASTConfig(
            **SHAPE, num_mel_bins=16, max_length=32, patch_size=8, frequency_stride=8, time_stride=8, num_labels=4)),
            transformers.ASTFeatureExtractor(num_mel_bins=16, max_length=32), root / "ast"),
    }
    return folders


@pytest.fixture(autouse=True)
def fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def task_config(task, model, folder, data, *overrides):
    return compose(["~experiment", f"task={task}", f"model={model}", f"model.hf={folder}", f"data={data}",
                    "measure.device=cpu", "logger=csv", "data.num_workers=0", *overrides])


def results(folder):
    return json.loads((folder / "task_results.json").read_text())["rows"]


def test_text_classification_end_to_end(tmp_path, saved, capsys):
    texts = ["a good film", "bad", "not a good film is very bad", "the red car is good", "blue bird on the grass",
             "very very bad film", "good", "the cat is not bad"]
    labels = ["positive", "negative", "negative", "positive", "positive", "negative", "positive", "positive"]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)))
    cfg = task_config("text_classification", "hf_bert_sst2", saved["bert"], "text_file", f"data.path={path}",
                      "data.batch_size=3", "reducer=tome", "reducer.r=1")
    run(cfg, tmp_path / "run")
    rows = results(tmp_path / "run")
    assert [r["reducer"] for r in rows] == ["none", "tome"]
    # the unreduced accuracy is the plain model's
    model = transformers.BertForSequenceClassification.from_pretrained(saved["bert"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(saved["bert"])
    with torch.no_grad():
        predicted = model(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(1)
    expected = np.mean([p == (y == "positive") for p, y in zip(predicted.tolist(), labels, strict=True)])
    assert rows[0]["accuracy"] == pytest.approx(expected)
    assert rows[0]["mac_fraction_text"] == 1 and 0.5 < rows[1]["mac_fraction_text"] < 1
    assert rows[0]["text_per_s"] > 0 and rows[1]["speedup_text"] > 0
    table = (tmp_path / "run" / "table.md").read_text()
    assert "| reducer | params | accuracy | texts/s | text speed-up | GMACs/text | text MAC frac. |" in table
    # accuracy a fraction with 4 decimals, speed-ups as ratios
    cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| tome ")][0]
    assert cells[2] == f"{rows[1]['accuracy']:.4f}" and cells[4] == f"{rows[1]['speedup_text']:.2f}x"
    assert "8 items, 2 classes" in capsys.readouterr().out
    logged = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "baseline/accuracy" in logged and "result/mac_fraction_text" in logged
    with pytest.raises(ConfigError, match="already holds table.md, task_results.json"):
        run(cfg, tmp_path / "run")


def test_sweep_summary_of_task_runs(tmp_path, saved):
    path = tmp_path / "set.csv"
    path.write_text("text,label\na good film,positive\nbad,negative\nthe red car,positive\n")
    for n, r in enumerate((1, 2)):
        run(task_config("text_classification", "hf_bert_sst2", saved["bert"], "text_file", f"data.path={path}",
                        "reducer=tome", f"reducer.r={r}"), tmp_path / "sweep" / str(n))
    summary = hf_tasks.collect_task_results(tmp_path / "sweep")
    lines = summary.read_text().splitlines()
    assert lines[0].startswith("text_classification: ") and "3 items, 2 classes" in lines[0]
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| run | reducer | params | accuracy |")
    assert [row.split(" | ")[:3] for row in table[2:]] == [["| 0", "none", "-"], ["| 0", "tome", "r=1"],
                                                            ["| 1", "tome", "r=2"]]
    with pytest.raises(ConfigError, match="already exists"):
        hf_tasks.collect_task_results(tmp_path / "sweep")
    assert hf_tasks.collect_task_results(tmp_path / "sweep" / "0" / "csv") is None
    # a Hydra multirun does it when its last job ends
    from omegaconf import OmegaConf

    from tokenreduce.engine.hydra_callbacks import CollectOnMultirunEnd

    first = summary.read_text()
    summary.unlink()
    CollectOnMultirunEnd().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}))
    assert summary.read_text() == first


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_retrieval_end_to_end(tmp_path, saved, family):
    annotations = karpathy_layout(tmp_path / "data", images=5, captions=2)
    # CLIP: both towers reduced, each by its own reducer; SigLIP: the image tower only
    reducer = (["reducer=tome", "reducer.r=2", "reducer@text_reducer=pitome", "text_reducer.r=1"] if family == "clip"
               else ["reducer=tome", "reducer.r=2", "reducer.prop_attn=false"])
    cfg = task_config("retrieval", f"hf_{family}_b16", saved[family], "karpathy", f"data.root={tmp_path / 'data'}",
                      f"data.annotations={annotations}", "data.batch_size=4", *reducer)
    run(cfg, tmp_path / "run")
    rows = results(tmp_path / "run")
    # the unreduced row equals recall computed here from the plain model's embeddings
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    model = cls.from_pretrained(saved[family]).eval()
    processor = transformers.AutoProcessor.from_pretrained(saved[family])
    data = hf_sets.read_karpathy(tmp_path / "data", annotations)
    with torch.no_grad():
        pixels = processor.image_processor(images=[hf_sets.load_image(p) for p in data.images],
                                           return_tensors="pt")["pixel_values"]
        images = model.get_image_features(pixel_values=pixels).pooler_output
        if family == "clip":
            encoded = processor.tokenizer(data.captions, padding=True, return_tensors="pt")
            texts = model.get_text_features(input_ids=encoded["input_ids"],
                                            attention_mask=encoded["attention_mask"]).pooler_output
        else:
            encoded = processor.tokenizer(data.captions, padding="max_length", max_length=64, return_tensors="pt")
            texts = model.get_text_features(input_ids=encoded["input_ids"]).pooler_output
    similarity = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    for k in (1, 5, 10):
        i2t, t2i = brute_recall(similarity, data.image_of, k)
        assert rows[0][f"i2t_r{k}"] == pytest.approx(i2t) and rows[0][f"t2i_r{k}"] == pytest.approx(t2i)
    assert rows[1]["mac_fraction_image"] < 1
    if family == "clip":
        assert rows[1]["text_reducer"] == "pitome" and rows[1]["text_params"]["r"] == 1
        assert rows[1]["mac_fraction_text"] < 1
    else:
        assert rows[1]["text_reducer"] == "none" and rows[1]["mac_fraction_text"] == pytest.approx(1)


def test_zeroshot_end_to_end(tmp_path, saved):
    for k, name in enumerate(["cat", "red_car", "bird"]):
        for i in range(2):
            write_image(tmp_path / "data" / name / f"{i}.jpg", seed=10 * k + i)
    cfg = task_config("zeroshot", "hf_clip_b16", saved["clip"], "image_classes", f"data.root={tmp_path / 'data'}",
                      'data.templates=["a photo of a {}.","the {}"]', "reducer=tome", "reducer.r=3")
    run(cfg, tmp_path / "run")
    rows = results(tmp_path / "run")
    model = transformers.CLIPModel.from_pretrained(saved["clip"]).eval()
    processor = transformers.AutoProcessor.from_pretrained(saved["clip"])
    data = hf_sets.read_image_classes(tmp_path / "data")
    with torch.no_grad():
        prompts = [t.format(n) for n in data.class_names for t in ("a photo of a {}.", "the {}")]
        encoded = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        texts = torch.nn.functional.normalize(model.get_text_features(**encoded).pooler_output, dim=-1)
        classes = torch.nn.functional.normalize(texts.view(3, 2, -1).mean(1), dim=-1)
        pixels = processor.image_processor(images=[hf_sets.load_image(p) for p in data.items],
                                           return_tensors="pt")["pixel_values"]
        images = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    predicted = (images @ classes.T).argmax(1)
    assert rows[0]["top1"] == pytest.approx((predicted == torch.tensor(data.labels)).float().mean().item())
    assert rows[0]["top5"] is None  # 3 classes
    assert rows[1]["mac_fraction_image"] < 1


def test_video_end_to_end(tmp_path, saved):
    index = tmp_path / "index.csv"
    lines = ["path,label"]
    for clip in range(4):
        for frame in range(6):
            write_image(tmp_path / "clips" / f"c{clip}" / f"{frame}.jpg", seed=clip * 10 + frame)
        lines.append(f"c{clip},{clip % 3}")
    index.write_text("\n".join(lines) + "\n")
    cfg = task_config("video_classification", "hf_videomae_b_k400", saved["video"], "video_clips",
                      f"data.root={tmp_path / 'clips'}", f"data.annotations={index}", "data.batch_size=2",
                      "reducer=tome", "reducer.r=4")
    run(cfg, tmp_path / "run")
    rows = results(tmp_path / "run")
    assert set(rows[0]) >= {"top1", "top5", "clip_per_s", "gmacs_clip"} and rows[0]["top5"] is None
    assert 0 <= rows[0]["top1"] <= 1 and rows[1]["mac_fraction_clip"] < 1


def test_audio_multilabel_end_to_end(tmp_path, saved):
    index = tmp_path / "index.csv"
    lines = ["path,label"]
    rng = np.random.default_rng(0)
    for clip in range(5):
        write_wav(tmp_path / "wav" / f"{clip}.wav", rng.uniform(-0.5, 0.5, 4000))
        lines.append(f"{clip}.wav,{clip % 4};{(clip + 1) % 4}")
    index.write_text("\n".join(lines) + "\n")
    cfg = task_config("audio_classification", "hf_ast_audioset", saved["ast"], "audio_clips",
                      f"data.root={tmp_path / 'wav'}", f"data.annotations={index}", "reducer=tome", "reducer.r=1")
    run(cfg, tmp_path / "run")
    rows = results(tmp_path / "run")
    assert "map" in rows[0] and "top1" not in rows[0] and 0 < rows[0]["map"] <= 1
    assert rows[1]["mac_fraction_clip"] < 1


@pytest.mark.parametrize("task", hf_tasks.specs())
def test_each_task_data_config_has_only_its_settings(task):
    spec = hf_tasks.specs()[task]
    for name in spec.data_names:
        data = compose([f"data={name}"]).data
        assert set(data) <= set(spec.data_keys), name
        assert data.batch_size >= 1 and data.name


# --- bad settings, before any compute --------------------------------------------------------------------
def test_bad_settings(tmp_path, saved):
    csv_file = tmp_path / "set.csv"
    csv_file.write_text("text,label\ngood,positive\n")
    base = ("text_classification", "hf_bert_sst2", saved["bert"], "text_file", f"data.path={csv_file}")
    with pytest.raises(ConfigError, match="model.hf_class='CLIPModel' is invalid; allowed: a ForSequenceClassification"):
        run(task_config(*base, "model.hf_class=CLIPModel"), tmp_path / "a")
    with pytest.raises(ConfigError, match="data.shuffle is not a setting of this task's data; allowed: name, path"):
        run(task_config(*base, "+data.shuffle=true"), tmp_path / "b")
    with pytest.raises(ConfigError, match="text_reducer=tome is invalid; allowed: none"):
        run(task_config(*base, "reducer@text_reducer=tome"), tmp_path / "c")
    with pytest.raises(ConfigError, match="model.hf=.*nowhere.*cannot read its config"):
        run(task_config(*base[:2], str(tmp_path / "nowhere"), *base[3:]), tmp_path / "d")
    with pytest.raises(ConfigError, match="tome: unknown parameter"):
        run(task_config(*base, "reducer=tome", "+reducer.energy=gaussian"), tmp_path / "e")
    with pytest.raises(ConfigError, match="task=retrieval: model.hf_class='BertForSequenceClassification' is invalid"):
        run(task_config("retrieval", "hf_bert_sst2", saved["bert"], "karpathy"), tmp_path / "f")
    # the data's files are checked before the model's config is read (a hub id would be fetched)
    with pytest.raises(ConfigError, match=r"data \(text classification\): data.path=.*nothing.csv: no such file"):
        run(task_config(*base[:2], "some-org/not-here", "text_file", f"data.path={tmp_path / 'nothing.csv'}"),
            tmp_path / "h")
    with pytest.raises(ConfigError, match=r"data \(audio classification\): data.root=None is invalid"):
        run(task_config("audio_classification", "hf_ast_audioset", "some-org/not-here", "audio_clips"), tmp_path / "i")
    with pytest.raises(ConfigError, match="data: batch_size=0 is invalid"):
        run(task_config(*base, "data.batch_size=0"), tmp_path / "g")
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcdefghi")


def test_missing_transformers_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ConfigError, match=r"install pip install 'tokenreduce\[hf\]'"):
        hf_tasks.check_model_config("retrieval", {"hf": "x", "hf_class": "CLIPModel"})
