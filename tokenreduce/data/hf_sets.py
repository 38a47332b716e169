"""The evaluation sets of the transformers tasks (docs/tasks.md), read from local files.

Each reader checks its files and fields and returns an index (paths or texts, and labels); nothing
is decoded until a batch is built, so every mistake is found before any model is loaded.

- `read_karpathy`: image-text retrieval in the Karpathy-split layout of Flickr30k and COCO: one
  JSON file (`images`: `filename`, optional `filepath`, `split`, `sentences`: `raw`) and the images.
- `read_texts`: text classification from a CSV/TSV file with a header, or JSON lines.
- `read_image_classes`: zero-shot classification over an ImageNet-style folder (one folder per class).
- `read_clips`: video (a folder of frame images per clip) or audio (a WAV file per clip) classification
  from a CSV index `path,label`, the label a class name or id; several labels joined by `;` for
  multi-label sets (AudioSet).
"""

from __future__ import annotations

import csv
import json
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenreduce.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
KARPATHY_SPLITS = ("train", "restval", "val", "test")


def existing(who: str, key: str, value, kind: str = "file") -> Path:
    """`value` as a path to an existing file (or folder); a ConfigError naming `key` if there is none."""
    if not value:
        raise ConfigError(f"{who}: {key}={value!r} is invalid; allowed: the path of a {kind}")
    path = Path(str(value)).expanduser()
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        raise ConfigError(f"{who}: {key}={value}: no such {kind}")
    return path


@dataclass
class CaptionSet:
    """Images and their captions: `image_of[t]` is the image caption t describes, `captions_of[i]`
    the captions of image i."""

    images: list[Path]
    captions: list[str]
    image_of: list[int]
    captions_of: list[list[int]]


def read_karpathy(root, annotations, split: str = "test", limit: int | None = None) -> CaptionSet:
    """The `split` of a Karpathy-layout JSON file (Flickr30k: `dataset_flickr30k.json`, COCO:
    `dataset_coco.json`), images under `root` (joined with each entry's `filepath` when it has one);
    `limit`: the first so many images."""
    who = "data (retrieval)"
    root = existing(who, "data.root", root, "folder")
    annotations = existing(who, "data.annotations", annotations)
    if split not in KARPATHY_SPLITS:
        raise ConfigError(f"{who}: data.split={split!r} is invalid; allowed: {', '.join(KARPATHY_SPLITS)}")
    try:
        entries = json.loads(annotations.read_text())["images"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{who}: data.annotations={annotations} is not a Karpathy-split JSON file with an 'images' "
                          f"list ({type(err).__name__}: {err})") from None
    entries = [e for e in entries if e.get("split") == split][:limit]
    if not entries:
        raise ConfigError(f"{who}: data.annotations={annotations} has no image in split {split!r}")
    images, captions, image_of, captions_of = [], [], [], []
    for i, entry in enumerate(entries):
        path = root / entry.get("filepath", "") / entry["filename"]
        if not path.is_file():
            raise ConfigError(f"{who}: image {path} (entry {entry['filename']!r} of {annotations}) does not exist")
        sentences = [s["raw"].strip() for s in entry.get("sentences", [])]
        if not sentences:
            raise ConfigError(f"{who}: image {entry['filename']!r} has no sentences in {annotations}")
        images.append(path)
        captions_of.append(list(range(len(captions), len(captions) + len(sentences))))
        captions += sentences
        image_of += [i] * len(sentences)
    return CaptionSet(images, captions, image_of, captions_of)


@dataclass
class LabelledSet:
    """Items (texts or paths) with their class ids; `labels[i]` is a list of ids in a multi-label set."""

    items: list
    labels: list
    class_names: list[str]
    multilabel: bool = False
    extra: dict = field(default_factory=dict)


def class_ids(who: str, values: list[str], class_names: list[str] | None) -> tuple[list[int], list[str]]:
    """Label values as class ids: a class name of `class_names`, or an integer id below its length;
    without `class_names`, integers are ids and names are numbered in sorted order."""
    if class_names is None:
        if all(v.strip().lstrip("-").isdigit() for v in values):
            ids = [int(v) for v in values]
            if min(ids) < 0:
                raise ConfigError(f"{who}: label {min(ids)} is invalid; allowed: ids >= 0 or class names")
            return ids, [str(k) for k in range(max(ids) + 1)]
        class_names = sorted(set(values))
    index = {name: k for k, name in enumerate(class_names)}
    ids = []
    for value in values:
        if value in index:
            ids.append(index[value])
        elif value.strip().isdigit() and int(value) < len(class_names):
            ids.append(int(value))
        else:
            shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
            raise ConfigError(f"{who}: label {value!r} is not one of the model's {len(class_names)} classes; allowed: "
                              f"{shown} (or an id below {len(class_names)})")
    return ids, list(class_names)


def _rows(who: str, path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise ConfigError(f"{who}: {path} line {n} is not JSON ({err})") from None
        return rows
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    raise ConfigError(f"{who}: {path} has suffix {path.suffix!r}; allowed: .csv, .tsv, .jsonl, .json (JSON lines)")


def _fields(who: str, path: Path, rows: list[dict], names: dict[str, str]) -> None:
    if not rows:
        raise ConfigError(f"{who}: {path} has no rows")
    for key, name in names.items():
        missing = next((n for n, row in enumerate(rows, 1) if name not in row), None)
        if missing is not None:
            raise ConfigError(f"{who}: {key}={name!r} is not a field of row {missing} of {path}; allowed: "
                              f"{', '.join(map(str, rows[missing - 1]))}")


def read_texts(path, text_field: str = "text", label_field: str = "label", class_names: list[str] | None = None,
               limit: int | None = None) -> LabelledSet:
    """Texts and labels from a CSV/TSV file with a header row or a JSON-lines file."""
    who = "data (text classification)"
    path = existing(who, "data.path", path)
    rows = _rows(who, path)[:limit]
    _fields(who, path, rows, {"data.text_field": text_field, "data.label_field": label_field})
    ids, names = class_ids(who, [str(row[label_field]) for row in rows], class_names)
    return LabelledSet([str(row[text_field]) for row in rows], ids, names)


def read_image_classes(root, class_names: list[str] | str | None = None, limit: int | None = None) -> LabelledSet:
    """Images in one folder per class (sorted folder names); the class names are the folder names with
    underscores as spaces, or `class_names`: a list, or a text file with one name per line, in the
    folders' sorted order."""
    who = "data (zero-shot)"
    root = existing(who, "data.root", root, "folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ConfigError(f"{who}: data.root={root} has no class folders")
    if isinstance(class_names, str):
        class_names = [n.strip() for n in existing(who, "data.class_names", class_names).read_text().splitlines()
                       if n.strip()]
    if class_names is None:
        class_names = [p.name.replace("_", " ") for p in folders]
    if len(class_names) != len(folders):
        raise ConfigError(f"{who}: data.class_names has {len(class_names)} names for {len(folders)} class folders "
                          f"in {root}; allowed: one name per folder")
    items, labels = [], []
    for k, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items += files
        labels += [k] * len(files)
    if not items:
        raise ConfigError(f"{who}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {root}")
    if limit is not None:  # an even spread over the classes, not the first classes only
        keep = np.linspace(0, len(items) - 1, min(limit, len(items))).round().astype(int)
        items, labels = [items[i] for i in keep], [labels[i] for i in keep]
    return LabelledSet(items, labels, list(class_names))


def read_clips(kind: str, root, annotations, class_names: list[str] | None = None, multilabel: bool | None = None,
               limit: int | None = None) -> LabelledSet:
    """Video or audio clips from a CSV index with the fields `path` (relative to `root`: a folder of
    frame images, or a WAV file) and `label` (class names or ids, several joined by `;`).
    `multilabel`: None decides by the index (any row with several labels)."""
    who = f"data ({kind} classification)"
    root = existing(who, "data.root", root, "folder")
    annotations = existing(who, "data.annotations", annotations)
    rows = _rows(who, annotations)[:limit]
    _fields(who, annotations, rows, {"path": "path", "label": "label"})
    split = [[v.strip() for v in str(row["label"]).split(";") if v.strip()] for row in rows]
    multilabel = any(len(v) > 1 for v in split) if multilabel is None else multilabel
    if not multilabel and any(len(v) != 1 for v in split):
        n = next(n for n, v in enumerate(split, 1) if len(v) != 1)
        raise ConfigError(f"{who}: row {n} of {annotations} has {len(split[n - 1])} labels; allowed: one per clip "
                          "(or data.multilabel=true)")
    ids, names = class_ids(who, [v for values in split for v in values], class_names)
    labels, start = [], 0
    for values in split:
        labels.append(ids[start:start + len(values)] if multilabel else ids[start])
        start += len(values)
    items = []
    for row in rows:
        path = root / row["path"]
        ok = path.is_dir() if kind == "video" else path.is_file()
        if not ok:
            raise ConfigError(f"{who}: {path} (row path={row['path']!r} of {annotations}) is not a "
                              f"{'folder of frames' if kind == 'video' else 'WAV file'}")
        items.append(path)
    return LabelledSet(items, labels, names, multilabel)


# --- decoding ------------------------------------------------------------------------------------------
def load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def load_frames(folder: Path, num_frames: int) -> list[Image.Image]:
    """`num_frames` frames spread evenly over the clip's frame images (sorted by name); a clip shorter
    than that repeats frames."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"data (video classification): {folder} has no frame images ({', '.join(IMAGE_SUFFIXES)})")
    picks = np.linspace(0, len(files) - 1, num_frames).round().astype(int)
    return [load_image(files[i]) for i in picks]


def load_wav(path: Path, sampling_rate: int) -> np.ndarray:
    """A PCM WAV file as float32 samples in [-1, 1], channels averaged; its rate must be `sampling_rate`
    (the feature extractor's), as resampling would change what the model hears."""
    with wave.open(str(path), "rb") as f:
        rate, width, channels = f.getframerate(), f.getsampwidth(), f.getnchannels()
        frames = f.readframes(f.getnframes())
    if rate != sampling_rate:
        raise ConfigError(f"data (audio classification): {path} is sampled at {rate} Hz; allowed: {sampling_rate} Hz "
                          "(the model's feature extractor), e.g. resample with `sox in.wav -r RATE out.wav`")
    if width == 1:
        samples = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        kind = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(frames, kind).astype(np.float32) / float(np.iinfo(kind).max + 1)
    else:
        raise ConfigError(f"data (audio classification): {path} has {8 * width}-bit samples; allowed: 8, 16 or "
                          "32-bit PCM")
    return samples.reshape(-1, channels).mean(axis=1)


def multi_hot(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    """[N, num_classes] 0/1 targets of a multi-label set."""
    target = torch.zeros(len(labels), num_classes, dtype=torch.long)
    for i, ids in enumerate(labels):
        target[i, ids] = 1
    return target
