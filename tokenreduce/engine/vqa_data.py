"""The question files of `task=vqa`: one JSON object per line, read and checked here, and converters from
the official GQA, TextVQA and POPE files to them.

A line: {"image": path (relative to the file's folder, or absolute), "question": str, "answers": [str, ...]
(VQAv2 and TextVQA: the ten annotators' answers; GQA, POPE: one), optional "question_id" and
"question_type"}. Every line is checked (keys, types, that the image is a file) before any model is
built; a ConfigError names the file, the line and what is wrong.

Converting (the result is never written over an existing file):

    python -m tokenreduce.engine.vqa_data gqa testdev_balanced_questions.json images/ data/vqa/gqa_testdev_balanced.jsonl
    python -m tokenreduce.engine.vqa_data textvqa TextVQA_0.5.1_val.json train_images/ data/vqa/textvqa_val.jsonl
    python -m tokenreduce.engine.vqa_data pope coco_pope_random.json val2014/ data/vqa/pope_random.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tokenreduce.engine.record import write_new
from tokenreduce.errors import ConfigError

KEYS = ("image", "question", "answers")  # what every line must hold


@dataclass(frozen=True)
class Question:
    image: Path  # resolved against the file's folder
    question: str
    answers: list[str]
    question_id: str | int | None = None
    question_type: str | None = None
    line: int = 0  # the line of the file it came from (1-based)


def read_questions(path: str | Path, limit: int | None = None, key: str = "vqa.questions") -> list[Question]:
    """The first `limit` questions (all when None) of the JSON-lines file `path`; blank lines are skipped.
    `key` is the setting that named the file, for the messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is not a file; allowed: a JSON-lines file of questions "
                          "(docs/vlm.md, 'VQA: task=vqa')")
    questions: list[Question] = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if limit is not None and len(questions) >= limit:
                break
            if text.strip():
                questions.append(_question(path, number, text, key))
    if not questions:
        raise ConfigError(f"{key}={str(path)!r} holds no questions; allowed: a JSON-lines file with one question "
                          "per line")
    return questions


def _question(path: Path, number: int, text: str, key: str) -> Question:
    where = f"{key}={str(path)!r}, line {number}"
    try:
        item = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not JSON ({err.msg}); allowed: one JSON object per line") from None
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: a {type(item).__name__}; allowed: an object with {', '.join(KEYS)}")
    missing = [k for k in KEYS if k not in item]
    if missing:
        raise ConfigError(f"{where}: no {', '.join(missing)}; allowed: an object with {', '.join(KEYS)} (and "
                          "optional question_id, question_type)")
    if not isinstance(item["question"], str) or not item["question"].strip():
        raise ConfigError(f"{where}: question={item['question']!r} is invalid; allowed: a non-empty string")
    answers = item["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"{where}: answers={answers!r} is invalid; allowed: a non-empty list of strings")
    if not isinstance(item["image"], str) or not item["image"]:
        raise ConfigError(f"{where}: image={item['image']!r} is invalid; allowed: a path, relative to the file's "
                          "folder or absolute")
    image = path.parent / Path(item["image"]).expanduser()  # an absolute path stays as it is
    if not image.is_file():
        raise ConfigError(f"{where}: image {str(image)!r} is not a file")
    qtype = item.get("question_type")
    return Question(image=image, question=item["question"], answers=list(answers), question_id=item.get("question_id"),
                    question_type=None if qtype is None else str(qtype), line=number)


# --- converters from the official files ------------------------------------------------------------
def gqa_lines(source: dict, images: Path) -> list[dict]:
    """GQA's `*_questions.json`: {question id: {"imageId", "question", "answer", "types": {"structural",
    ...}}}; the image is `<imageId>.jpg` in `images`; the question type is the structural one."""
    return [{"image": str(images / f"{q['imageId']}.jpg"), "question": q["question"], "answers": [q["answer"]],
             "question_id": qid, "question_type": (q.get("types") or {}).get("structural")}
            for qid, q in source.items()]


def textvqa_lines(source: dict, images: Path) -> list[dict]:
    """TextVQA's `TextVQA_0.5.1_{train,val}.json`: {"data": [{"question_id", "image_id", "question",
    "answers" (ten)}]}; the image is `<image_id>.jpg` in `images` (train_images/ holds the val images too)."""
    return [{"image": str(images / f"{q['image_id']}.jpg"), "question": q["question"], "answers": list(q["answers"]),
             "question_id": q["question_id"]} for q in source["data"]]


def pope_lines(source: list[dict] | dict, images: Path) -> list[dict]:
    """POPE's files (`coco_pope_{random,popular,adversarial}.json`, one object per line): {"question_id",
    "image" (a file name), "text" (the question), "label" (yes/no), optional "category"}."""
    if isinstance(source, dict):  # a file of one line reads as one JSON document
        source = [source]
    return [{"image": str(images / q["image"]), "question": q["text"], "answers": [q["label"]],
             "question_id": q["question_id"], "question_type": q.get("category")} for q in source]


CONVERTERS = {"gqa": gqa_lines, "textvqa": textvqa_lines, "pope": pope_lines}


def load_json_or_lines(path: Path):
    """A JSON document, or (POPE's files) one JSON object per line, as a list."""
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def convert(kind: str, source: str | Path, images: str | Path, out: str | Path) -> Path:
    """Write the official file `source` of dataset `kind` as our JSON lines at `out` (a new file), the
    image paths relative to `out`'s folder."""
    if kind not in CONVERTERS:
        raise ConfigError(f"kind={kind!r} is invalid; allowed: {', '.join(CONVERTERS)}")
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.is_file():
        raise ConfigError(f"source={str(source)!r} is not a file; allowed: the official {kind} question file")
    try:
        lines = CONVERTERS[kind](load_json_or_lines(source), Path(images).expanduser().resolve())
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ConfigError(f"source={str(source)!r} is not an official {kind} question file ({type(err).__name__}: "
                          f"{err})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent.resolve()
    for line in lines:  # relative to the file's folder: the data folder can move as a whole
        line["image"] = os.path.relpath(line["image"], folder)
    return write_new(out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenreduce.engine.vqa_data",
                                     description="Convert official GQA, TextVQA or POPE question files to the JSON "
                                                 "lines of task=vqa.")
    parser.add_argument("kind", choices=sorted(CONVERTERS))
    parser.add_argument("source", help="the official question file")
    parser.add_argument("images", help="the folder holding its images")
    parser.add_argument("out", help="the JSON-lines file to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        written = convert(args.kind, args.source, args.images, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{sum(1 for _ in open(written, encoding='utf-8'))} questions written to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
