"""task=text_classification: accuracy of a `*ForSequenceClassification` model on a CSV/TSV/JSON-lines
set (data=text_file)."""

from __future__ import annotations

from tokenreduce.data import hf_sets
from tokenreduce.engine.hf_tasks import (
    Job,
    TransformersTask,
    classify,
    part,
    read_labelled,
    register_transformers_task,
)

NAME = "text_classification"


def read_data(data: dict, config_of) -> hf_sets.LabelledSet:
    return read_labelled(NAME, data, config_of, {"path": "file"}, lambda d, names: hf_sets.read_texts(
        d.get("path"), d.get("text_field", "text"), d.get("label_field", "label"), names, d.get("texts")))


def evaluate(job: Job) -> dict:
    tokenizer = part(job.processor, "tokenizer")

    def decode(texts):
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=job.data.get("max_length"),
                            return_tensors="pt")
        return {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}

    return {"accuracy": classify(job, decode, "text")["top1"]}


TASK = register_transformers_task(TransformersTask(
    name=NAME, classes=("ForSequenceClassification",),
    data_keys=("name", "path", "text_field", "label_field", "class_names", "texts", "batch_size", "num_workers",
               "max_length"),
    data_names=("text_file",), processor="AutoTokenizer", units=("text",), read_data=read_data, evaluate=evaluate,
))
