"""task=zeroshot: CLIP/SigLIP zero-shot top-1/top-5 on a folder of class folders, each class's
embedding from prompt templates (data=image_classes)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.data import hf_sets
from tokenreduce.engine.hf_tasks import Job, TransformersTask, register_transformers_task, topk_accuracy
from tokenreduce.errors import ConfigError


def read_data(data: dict, config_of) -> hf_sets.LabelledSet:
    templates = data.get("templates") or ["a photo of a {}."]
    if isinstance(templates, str) or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ConfigError(f"data.templates={templates!r} is invalid; allowed: a list of prompts, each with {{}} "
                          "where the class name goes")
    data["templates"] = list(templates)
    return hf_sets.read_image_classes(data.get("root"), data.get("class_names"), data.get("images"))


def class_embeddings(job: Job, class_names: list[str], templates: list[str]) -> Tensor:
    """One embedding per class: the normalised mean of its prompts' normalised embeddings."""
    prompts = [t.format(name) for name in class_names for t in templates]
    embeds = job.embed_texts(prompts).view(len(class_names), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(embeds, dim=-1)


def evaluate(job: Job) -> dict:
    data: hf_sets.LabelledSet = job.dataset
    classes = class_embeddings(job, data.class_names, job.data["templates"])
    logits = job.embed_images(data.items) @ classes.T
    labels = torch.tensor(data.labels)
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}


TASK = register_transformers_task(TransformersTask(
    name="zeroshot", classes=("CLIPModel", "SiglipModel"),
    data_keys=("name", "root", "class_names", "templates", "images", "batch_size", "num_workers", "max_length"),
    data_names=("image_classes",), processor="AutoProcessor", units=("image", "text"), read_data=read_data,
    evaluate=evaluate,
))
