"""What the image-classification tasks (evaluate, finetune, compare, search) share: the model, the
data module, the `measure` settings, plugins, and the checkpoint they start from."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from tokenreduce import models
from tokenreduce.engine.config import plain
from tokenreduce.engine.speed import check_measure
from tokenreduce.engine.weights import read_checkpoint
from tokenreduce.errors import ConfigError

MEASURE_KEYS = ("enabled", "batch_size", "dtype", "autocast", "device", "warmup", "repeats")
MODEL_KEYS = ("name", "pretrained", "checkpoint", "img_size", "num_classes", "drop_path_rate", "kwargs",
              "adapter_options")


def build_model(model_cfg: DictConfig | dict) -> nn.Module:
    """The model of the `model` config: an offline model (`tokenreduce.models`) or a timm model,
    with pretrained weights from its source, the hub or a local file."""
    cfg = plain(model_cfg)
    unknown = sorted(set(cfg) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not a model setting; allowed: {', '.join(MODEL_KEYS)}")
    name = cfg.get("name")
    if not isinstance(name, str) or not models.is_model(name):
        raise ConfigError(f"model.name={name!r} is not a model; allowed: an offline model "
                          f"({', '.join(models.available())}) or a timm model (timm.list_models())")
    kwargs = dict(cfg.get("kwargs") or {})
    for key in ("img_size", "num_classes"):
        if cfg.get(key) is not None:
            kwargs[key] = cfg[key]
    if cfg.get("drop_path_rate"):
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    return models.create_model(name, pretrained=bool(cfg.get("pretrained")), checkpoint=cfg.get("checkpoint"),
                               **kwargs)


def weights_label(model_cfg: dict, model: nn.Module, ckpt_path: str | None = None) -> str:
    """Where the weights come from: a Lightning checkpoint (`ckpt_path`), a file, a source, or none."""
    if ckpt_path:
        return f"checkpoint:{Path(ckpt_path).resolve()}"
    if model_cfg.get("checkpoint"):
        return f"file:{model_cfg['checkpoint']}"
    if not model_cfg.get("pretrained"):
        return "random"
    if model_cfg["name"] in models.available():
        return f"offline:{model_cfg['name']}"
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    tag = cfg.get("tag")
    return f"timm:{cfg.get('architecture', model_cfg['name'])}" + (f".{tag}" if tag else "")


def import_plugins(modules: list[str]) -> None:
    """Import the modules listed in `imports`, e.g. one that registers a reducer of your own."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise ConfigError(f"imports: cannot import {name!r} ({err}); list modules importable from this "
                              "environment") from None


def build_datamodule(data_cfg: DictConfig):
    """The `data` config's data module; a ConfigError its constructor raises comes out as itself,
    not wrapped in Hydra's "Error in call to target"."""
    try:
        return instantiate(data_cfg, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"data: {' '.join(str(err).split())}") from None


@dataclass
class ImageRun:
    """The settings every image task checks first: its data module (checked for `stage` and the
    evaluation split), `measure`, and the state dict of `ckpt_path`."""

    datamodule: object
    measure: dict
    checkpoint: dict | None  # read (memory-mapped) and checked before any compute

    @classmethod
    def check(cls, cfg: DictConfig, stage: str | None, probe: bool) -> ImageRun:
        """`stage`: the data module's stage to check (None: only the evaluation split); `probe`:
        whether the measuring device is tried in its dtypes."""
        datamodule = build_datamodule(cfg.data)  # before measure: measure.batch_size defaults to data.batch_size
        measure = plain(cfg.measure)
        unknown = sorted(set(measure) - set(MEASURE_KEYS))
        if unknown:
            raise ConfigError(f"measure.{unknown[0]} is not a setting; allowed: {', '.join(MEASURE_KEYS)}")
        check_measure(measure["batch_size"], measure["dtype"], measure["autocast"], measure["device"],
                      measure["warmup"], measure["repeats"], probe=probe)
        datamodule.shuffle_seed = cfg.seed
        if stage is not None:
            datamodule.check(stage)
        if cfg.eval_split == "test":
            datamodule.check("test")
        ckpt_path = cfg.get("ckpt_path")
        return cls(datamodule, measure, read_checkpoint(ckpt_path) if ckpt_path is not None else None)
