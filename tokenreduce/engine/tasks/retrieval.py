"""task=retrieval: image->text and text->image recall@1/5/10 of CLIP/SigLIP on a Karpathy-split
Flickr30k or COCO layout (data=karpathy)."""

from __future__ import annotations

import torch

from tokenreduce.data import hf_sets
from tokenreduce.engine.hf_tasks import Job, TransformersTask, recall_at_k, register_transformers_task


def read_data(data: dict, config_of) -> hf_sets.CaptionSet:
    return hf_sets.read_karpathy(data.get("root"), data.get("annotations"), data.get("split", "test"),
                                 data.get("images"))


def evaluate(job: Job) -> dict:
    captions: hf_sets.CaptionSet = job.dataset
    image_embeds = job.embed_images(captions.images)
    text_embeds = job.embed_texts(captions.captions)
    return recall_at_k(image_embeds @ text_embeds.T, torch.tensor(captions.image_of))


TASK = register_transformers_task(TransformersTask(
    name="retrieval", classes=("CLIPModel", "SiglipModel"),
    data_keys=("name", "root", "annotations", "split", "images", "batch_size", "num_workers", "max_length"),
    data_names=("karpathy",), processor="AutoProcessor", units=("image", "text"), read_data=read_data,
    evaluate=evaluate,
))
