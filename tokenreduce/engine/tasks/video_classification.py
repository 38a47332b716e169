"""task=video_classification: top-1/top-5 (mAP for a multi-label set) of a `*ForVideoClassification`
model (VideoMAE) on frame folders with a CSV index (data=video_clips)."""

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

NAME = "video_classification"
CLIP_KEYS = ("name", "root", "annotations", "class_names", "multilabel", "clips", "batch_size", "num_workers")


def read_clips(task: str, modality: str):
    """The data reader of a clip-classification task: a folder and its CSV index."""
    return lambda data, config_of: read_labelled(
        task, data, config_of, {"root": "folder", "annotations": "file"}, lambda d, names: hf_sets.read_clips(
            modality, d.get("root"), d.get("annotations"), names, d.get("multilabel"), d.get("clips")))


def evaluate(job: Job) -> dict:
    frames = job.model.config.num_frames

    def decode(folders):
        clips = [hf_sets.load_frames(folder, frames) for folder in folders]
        return {"pixel_values": part(job.processor, "image_processor")(clips, return_tensors="pt")["pixel_values"]}

    return classify(job, decode, "clip")


TASK = register_transformers_task(TransformersTask(
    name=NAME, classes=("ForVideoClassification",), data_keys=CLIP_KEYS, data_names=("video_clips",),
    processor="AutoImageProcessor", units=("clip",), read_data=read_clips(NAME, "video"), evaluate=evaluate,
))
