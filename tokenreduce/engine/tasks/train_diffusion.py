"""task=train_diffusion: train the class-conditional Fashion-MNIST diffusion model
(`models/fmnist_diffusion.py`) with Lightning, checkpointed and resumable from `ckpt_path` as a
fine-tune is, then write a grid of DDIM samples of every class and a record (`diffusion.json`)."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from tokenreduce.data.fashion_mnist import FashionMNISTDataModule, ShapeImages
from tokenreduce.engine.config import plain
from tokenreduce.engine.console import tell
from tokenreduce.engine.diffusion_module import DiffusionModule, DiffusionOptim, check_module_settings
from tokenreduce.engine.loggers import check_loggers
from tokenreduce.engine.record import staged_file, write_new
from tokenreduce.engine.step_training import (
    check_keys,
    check_loss_monitor,
    fit,
    logged,
    save_state_dict,
    step_trainer,
)
from tokenreduce.engine.tasks import ONE_MODEL, RunContext, Task, register_task
from tokenreduce.engine.tasks.common import build_datamodule
from tokenreduce.engine.tasks.finetune import check_training_length
from tokenreduce.engine.tasks.lightning import checkpoints_of
from tokenreduce.errors import ConfigError, check_number

KEYS = ("model", "schedule", "optim", "class_dropout", "ema_decay", "samples")
SAMPLE_KEYS = ("per_class", "steps", "guidance", "seed")
RECORD = "diffusion.json"
WEIGHTS_FILE = "fmnist_diffusion.safetensors"  # the sampling weights, as the package ships them


@dataclass
class DiffusionSettings:
    datamodule: FashionMNISTDataModule
    model: dict
    schedule: dict
    optim: DiffusionOptim
    class_dropout: float
    ema_decay: float | None
    samples: dict
    checkpoint: dict


@dataclass(frozen=True)
class DiffusionRecord:
    """What a run wrote to `diffusion.json`."""

    values: dict
    top1 = None  # no classification metric: nothing for a sweep to optimise


def check(cfg: DictConfig, overrides: list[str] | None) -> DiffusionSettings:
    from tokenreduce.models.fmnist_diffusion import model_config, schedule_config

    d = plain(cfg.get("diffusion")) or {}
    check_keys("diffusion", d, KEYS)
    optim_cfg = d.get("optim") or {}
    check_keys("diffusion.optim", optim_cfg, DiffusionOptim.settings())
    samples = {"per_class": 8, "steps": 50, "guidance": 4.0, "seed": 0, **(d.get("samples") or {})}
    check_keys("diffusion.samples", samples, SAMPLE_KEYS)
    checkpoint = plain(cfg.checkpoint)
    check_loss_monitor(checkpoint, "train_diffusion")
    check_training_length(plain(cfg.trainer))
    check_loggers(plain(cfg.logger))
    model_config(**(d.get("model") or {}))
    schedule = schedule_config(**(d.get("schedule") or {}))
    optim = DiffusionOptim(**optim_cfg)
    class_dropout, ema_decay = d.get("class_dropout", 0.1), d.get("ema_decay", 0.999)
    check_module_settings(class_dropout, ema_decay)
    # the samples come after hours of training: a bad setting of theirs must fail now
    check_number("diffusion.samples", "per_class", samples["per_class"], low=0, integer=True)
    check_number("diffusion.samples", "steps", samples["steps"], low=1, high=schedule["num_train_timesteps"],
                 integer=True)
    check_number("diffusion.samples", "guidance", samples["guidance"], low=0, finite=True)
    check_number("diffusion.samples", "seed", samples["seed"], low=0, integer=True)
    datamodule = build_datamodule(cfg.data)
    if not isinstance(datamodule, FashionMNISTDataModule):
        raise ConfigError(f"data={cfg.data.get('name')} is invalid for task=train_diffusion; allowed: fashion_mnist")
    datamodule.shuffle_seed = cfg.seed
    datamodule.check("fit")
    return DiffusionSettings(datamodule, d.get("model") or {}, d.get("schedule") or {}, optim,
                             class_dropout, ema_decay, samples, checkpoint)


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    """Images in [-1, 1], [N, 1, H, W], as one grey PNG of `rows` rows."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = n // rows
    grid = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    grid = grid.view(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)
    with staged_file(path) as temporary:  # a new file, never half-written, as every result
        Image.fromarray(grid.numpy(), mode="L").save(temporary, format="PNG")


def save_weights(model, path: Path) -> None:
    """The model's state dict as a new safetensors file (what `load_fmnist_diffusion` reads)."""
    save_state_dict(model.state_dict(), path)


def run(context: RunContext, settings: DiffusionSettings):
    from tokenreduce.diffusion_sampling import sample
    from tokenreduce.models.fmnist_diffusion import NUM_CLASSES, create_fmnist_diffusion, noise_schedule

    cfg, output_dir = context.cfg, Path(context.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = create_fmnist_diffusion(**settings.model)
    size = model.config.sample_size
    datamodule = settings.datamodule
    # pixels to [-1, 1]: mean 0.5, std 0.5 on the 0..1 scale; the augmentation is the data config's
    datamodule.shaper = ShapeImages((1, size, size), (0.5,), (0.5,), "pad")
    datamodule.augmenter = ShapeImages((1, size, size), (0.5,), (0.5,), "pad", shift=datamodule.shift,
                                       hflip=datamodule.hflip)
    module = DiffusionModule(model, noise_schedule("train", **settings.schedule), settings.optim,
                             settings.class_dropout, settings.ema_decay)
    with step_trainer(context, settings.checkpoint, cfg.get("run_name") or "fmnist_diffusion") as trainer:
        fit(trainer, module, datamodule, context)
        if not trainer.is_global_zero:
            return None
        s = settings.samples
        classes = [c for c in range(NUM_CLASSES) for _ in range(s["per_class"])]
        images = sample(module.sampling_model, classes, steps=s["steps"], guidance=s["guidance"], seed=s["seed"]) \
            if classes else None
        if images is not None:
            save_grid(images, NUM_CLASSES, output_dir / "samples.png")
        save_weights(module.sampling_model, output_dir / WEIGHTS_FILE)
        record = {"task": "train_diffusion", "global_step": trainer.global_step,
                  "train_loss": logged(trainer, "train/loss"), "val_loss": logged(trainer, "val/loss"),
                  "num_params": sum(p.numel() for p in model.parameters()), "model": dict(model.config),
                  "checkpoints": checkpoints_of(trainer), "weights": WEIGHTS_FILE, "samples": s, "seed": cfg.seed,
                  "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        write_new(output_dir / RECORD, json.dumps(record, indent=2, default=str))
        tell(f"train_diffusion: step {record['global_step']}, val/loss {record['val_loss']}; samples in "
             f"{output_dir / 'samples.png'}")
        return DiffusionRecord(record)


TASK = register_task(Task(name="train_diffusion", check=check, run=run,
                          unused=("model", "optim", "loss", "measure", "reducer", "text_reducer", *ONE_MODEL),
                          reads="diffusion.* (model, schedule, optim, class_dropout, ema_decay, samples)"))
