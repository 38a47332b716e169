"""task=compare: the unreduced model beside every reducer of `compare.reducers`, each set to every
fraction of `compare.mac_fractions` of its MACs, timed side by side (engine/compare.py)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from omegaconf import DictConfig

from tokenreduce.engine.compare import CompareSettings, run_compare, settings_from
from tokenreduce.engine.config import plain
from tokenreduce.engine.tasks import TRAINING, RunContext, Task, register_task
from tokenreduce.engine.tasks.common import ImageRun, build_model, weights_label
from tokenreduce.engine.weights import load_backbone

# the settings neither compare nor search reads: they build their own reducers and time on measure.device
NO_TRAINER = ("reducer", "text_reducer", "trainer", "logger", "run_name", *TRAINING)


@dataclass
class Settings:
    compare: CompareSettings
    image: ImageRun


def check(cfg: DictConfig, overrides: list[str] | None) -> Settings:
    compare = settings_from(cfg)
    return Settings(compare, ImageRun.check(cfg, "validate" if cfg.eval_split == "val" else None, probe=True))


def start_model(context: RunContext, image: ImageRun):
    """The unreduced model with the weights of `ckpt_path` (a fine-tune's, without a learned
    reducer's own) where one is given, bound to the data; its weights' label and config."""
    cfg = context.cfg
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg.model)
    model_cfg = plain(cfg.model)
    if image.checkpoint is not None:
        load_backbone(model, image.checkpoint, cfg.ckpt_path, model_cfg["name"])
    image.datamodule.bind_model(model)
    return model, weights_label(model_cfg, model, cfg.get("ckpt_path")), model_cfg


def run(context: RunContext, settings: Settings) -> None:
    model, weights, model_cfg = start_model(context, settings.image)
    run_compare(context.cfg, settings.compare, context.output_dir, model, settings.image.datamodule, weights,
                model_cfg["name"], model_cfg.get("adapter_options"))


TASK = register_task(Task(
    name="compare", check=check, run=run, unused=(*NO_TRAINER, "search", "budget"),
    reads="it compares compare.reducers, each at compare.mac_fractions, and times on measure.device",
))
