"""task=audio_classification: top-1/top-5 (mAP for a multi-label set) of a `*ForAudioClassification`
model (AST) on PCM WAV files with a CSV index (data=audio_clips)."""

from __future__ import annotations

from tokenreduce.data import hf_sets
from tokenreduce.engine.hf_tasks import Job, TransformersTask, classify, part, register_transformers_task
from tokenreduce.engine.tasks.video_classification import CLIP_KEYS, read_clips

NAME = "audio_classification"


def evaluate(job: Job) -> dict:
    extractor = part(job.processor, "feature_extractor")

    def decode(paths):
        waves = [hf_sets.load_wav(p, extractor.sampling_rate) for p in paths]
        return {"input_values": extractor(waves, sampling_rate=extractor.sampling_rate, return_tensors="pt")[
            "input_values"]}

    return classify(job, decode, "clip")


TASK = register_transformers_task(TransformersTask(
    name=NAME, classes=("ForAudioClassification",), data_keys=CLIP_KEYS, data_names=("audio_clips",),
    processor="AutoFeatureExtractor", units=("clip",), read_data=read_clips(NAME, "audio"), evaluate=evaluate,
))
