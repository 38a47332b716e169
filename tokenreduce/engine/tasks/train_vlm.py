"""task=train_vlm: train the Fashion-MNIST vision-language model (`models/fmnist_vlm.py`) on templated
questions with Lightning, checkpointed and resumable from `ckpt_path` as task=train_diffusion is, then
answer questions about the held-out images by greedy generation and write the weights and a record
(`vlm.json`) with the accuracy per question kind.

Every training image is asked one question drawn afresh at each epoch under the sample's own seed
(so a resumed run sees the questions the interrupted one would have): a kind from `KINDS`, then the
question of that kind (`fmnist_vlm.ask`: yes and no equally often), followed by LLaVA-1.5's
short-answer instruction with probability `vlm.instructed`. The loss is the cross-entropy of the
answer word and </s> only. Validation asks every held-out image one question of each kind (the
instruction on every other image) and logs the loss and the accuracy of the answer word read from the
same pass (the greedy first token); the final record generates the answers with `model.generate`.
"""

from __future__ import annotations

import datetime
import json
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import Dataset

from tokenreduce.data.fashion_mnist import FashionMNISTDataModule, ShapeImages
from tokenreduce.data.resumable import mix_seed
from tokenreduce.data.splits import SplitLoaders
from tokenreduce.engine.config import plain
from tokenreduce.engine.console import tell
from tokenreduce.engine.loggers import check_loggers
from tokenreduce.engine.record import write_new
from tokenreduce.engine.step_training import (
    StepOptim,
    check_keys,
    check_loss_monitor,
    fit,
    logged,
    save_state_dict,
    step_schedule,
    step_trainer,
)
from tokenreduce.engine.tasks import ONE_MODEL, RunContext, Task, register_task
from tokenreduce.engine.tasks.common import build_datamodule
from tokenreduce.engine.tasks.finetune import check_training_length
from tokenreduce.engine.tasks.lightning import checkpoints_of
from tokenreduce.errors import ConfigError, check_number

KEYS = ("model", "vision", "optim", "instructed", "eval_images")
RECORD = "vlm.json"
WEIGHTS_FILE = "fmnist_vlm.safetensors"  # the final weights, as the package ships them


@dataclass
class VLMOptim(StepOptim):
    """`StepOptim` (AdamW, warm-up, then constant or cosine) with the vision tower's learning rate
    scaled by `vision_lr_scale` (it starts from fmnist_vit's trained weights; 0 keeps them). Weight
    decay applies to matrices only, not to biases and norms."""

    SECTION: ClassVar[str] = "vlm.optim"

    vision_lr_scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_number(self.SECTION, "vision_lr_scale", self.vision_lr_scale, low=0, finite=True)


# --- the data --------------------------------------------------------------------------------------
class AskedImages(Dataset):
    """Training images, each asked a question drawn at every read from Python's `random` (seeded per
    sample by the resumable loader): (image, kind index, user text, answer, instructed)."""

    def __init__(self, images: Dataset, kinds: tuple[str, ...], instructed: float):
        self.images, self.kinds, self.instructed = images, kinds, instructed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from tokenreduce.models.fmnist_vlm import ask, user_text

        image, label = self.images[index]
        kind = random.randrange(len(self.kinds))
        question, reply = ask(self.kinds[kind], label, random)
        instructed = random.random() < self.instructed
        return image, kind, user_text(question, instructed), reply, instructed


class FixedQuestions(Dataset):
    """Each image asked one question of every kind, the same at every read: item j is image j // K
    with kind j % K (K kinds, so any first items mix them), its question drawn from (seed, j), the
    instruction after it on every other image."""

    def __init__(self, images: Dataset, kinds: tuple[str, ...], seed: int):
        self.images, self.kinds, self.seed = images, kinds, seed

    def __len__(self) -> int:
        return len(self.images) * len(self.kinds)

    def __getitem__(self, index: int):
        from tokenreduce.models.fmnist_vlm import ask, user_text

        image_index, kind = divmod(index, len(self.kinds))
        image, label = self.images[image_index]
        question, reply = ask(self.kinds[kind], label, random.Random(mix_seed(self.seed, index)))
        instructed = image_index % 2 == 1
        return image, kind, user_text(question, instructed), reply, instructed


class QuestionData(SplitLoaders, L.LightningDataModule):
    """Fashion-MNIST's splits (`images`, a `FashionMNISTDataModule`: its root, held-out split, batch
    sizes and augmentation) as question batches: `pixel_values` padded and normalised as fmnist_vit's
    pipeline (augmented in training), the encoder's `input_ids`, `attention_mask`, `position_ids`,
    `labels`, and each question's `kind` and whether it is `instructed`."""

    def __init__(self, images: FashionMNISTDataModule, encoder, instructed: float = 0.5, seed: int = 0):
        from tokenreduce.models.fmnist_vlm import FMNIST_MEAN, FMNIST_STD, KINDS, VISION

        super().__init__()
        self.images, self.encoder, self.instructed, self.seed = images, encoder, instructed, seed
        self.kinds = KINDS
        self.batch_size, self.eval_batch_size = images.batch_size, images.eval_batch_size
        self.num_workers = images.num_workers
        side = VISION["image_size"]
        images.shaper = ShapeImages((1, side, side), FMNIST_MEAN, FMNIST_STD, "pad")
        images.augmenter = ShapeImages((1, side, side), FMNIST_MEAN, FMNIST_STD, "pad", shift=images.shift,
                                       hflip=images.hflip)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        self.images.setup(stage)
        self.train_set = AskedImages(self.images.train_set, self.kinds, self.instructed)
        self.val_set = FixedQuestions(self.images.val_set, self.kinds, self.seed)
        self.test_set = FixedQuestions(self.images.test_set, self.kinds, self.seed)

    def collate(self, items, training: bool) -> dict:
        shaper = self.images.augmenter if training else self.images.shaper
        pixels = shaper(torch.stack([item[0] for item in items]), training=training)
        batch = self.encoder.encode([item[2] for item in items], [item[3] for item in items])
        batch["pixel_values"] = pixels
        batch["kind"] = torch.tensor([item[1] for item in items])
        batch["instructed"] = torch.tensor([item[4] for item in items])
        return batch

    def _loader_options(self, training: bool) -> dict:
        return {"collate_fn": partial(self.collate, training=training), "num_workers": self.num_workers}


# --- the module ------------------------------------------------------------------------------------
class VLMModule(L.LightningModule):
    """`model` (fmnist_vlm) trained on `QuestionData` batches: cross-entropy of the tokens `labels`
    marks (the answer and </s>), each predicted from the position before it."""

    def __init__(self, model, optim: VLMOptim | None = None, model_config: dict | None = None):
        super().__init__()
        from tokenreduce.models.fmnist_vlm import KINDS

        self.model = model
        self.optim = optim or VLMOptim()
        self.model_config = dict(model_config or {})
        self.kinds = KINDS
        self._correct = torch.zeros(len(KINDS), 2)  # validation: [kind, instructed] right answers
        self._asked = torch.zeros(len(KINDS), 2)
        self.validated_at: int | None = None  # the step of the last validation (not the sanity check)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from tokenreduce.models.fmnist_vlm import MODEL_CONFIG_KEY, VOCAB, VOCAB_KEY

        # the architecture and vocabulary beside the weights, as plain values (read weights-only)
        checkpoint[MODEL_CONFIG_KEY] = dict(self.model_config)
        checkpoint[VOCAB_KEY] = list(VOCAB)

    def forward_logits(self, batch: dict) -> torch.Tensor:
        return self.model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits

    @staticmethod
    def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the tokens `labels` keeps (not -100), each from the logits one before."""
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    def training_step(self, batch, batch_idx):
        loss = self.answer_loss(self.forward_logits(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._correct.zero_()
        self._asked.zero_()

    def validation_step(self, batch, batch_idx):
        logits = self.forward_logits(batch)
        labels = batch["labels"]
        self.log("val/loss", self.answer_loss(logits, labels), prog_bar=True, batch_size=len(labels), sync_dist=True)
        # the answer word is the first kept label; its greedy prediction is the argmax one position before
        first = (labels != -100).int().argmax(dim=1)
        rows = torch.arange(len(labels), device=labels.device)
        right = (logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().cpu()
        index = batch["kind"].cpu() * 2 + batch["instructed"].long().cpu()
        self._correct.view(-1).index_add_(0, index, right)
        self._asked.view(-1).index_add_(0, index, torch.ones_like(right))

    def on_validation_epoch_end(self) -> None:
        if self._asked.sum() == 0:
            return
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step
        for k, kind in enumerate(self.kinds):
            if self._asked[k].sum():
                self.log(f"val/acc_{kind}", self._correct[k].sum() / self._asked[k].sum(), sync_dist=True)
        self.log("val/accuracy", self._correct.sum() / self._asked.sum(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        o = self.optim
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in self.model.named_parameters():  # a tied weight appears once
            if param.requires_grad:
                key = (name.startswith("model.vision_tower."), param.ndim >= 2)
                groups.setdefault(key, []).append(param)
        params = [{"params": ps, "lr": o.lr * (o.vision_lr_scale if tower else 1.0),
                   "weight_decay": o.weight_decay if matrix else 0.0} for (tower, matrix), ps in sorted(groups.items())]
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas)
        return {"optimizer": optimizer, "lr_scheduler": step_schedule(optimizer, o, self)}


# --- evaluation by generation ----------------------------------------------------------------------
@torch.no_grad()
def generation_accuracy(model, data: QuestionData, dataset: FixedQuestions, images: int | None = None,
                        batch_size: int = 256) -> dict:
    """Greedy answers (`fmnist_vlm.answer`) to the questions of the first `images` images of `dataset`
    (all when None): the accuracy per kind, per prompt form (plain, instructed) and overall."""
    from tokenreduce.models.fmnist_vlm import answer

    count = len(dataset) if images is None else min(len(dataset), images * len(dataset.kinds))
    model.eval()
    right = torch.zeros(len(dataset.kinds), 2)
    asked = torch.zeros(len(dataset.kinds), 2)
    device = next(model.parameters()).device
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(count, start + batch_size))]
        batch = data.collate(items, training=False)
        replies = answer(model, data.encoder, batch["pixel_values"].to(device), [item[2] for item in items])
        for (_, kind, _, truth, instructed), reply in zip(items, replies, strict=True):
            right[kind, int(instructed)] += float(reply == truth)
            asked[kind, int(instructed)] += 1
    result = {"questions": int(asked.sum()), "accuracy": float(right.sum() / asked.sum())}
    result["by_kind"] = {kind: float(right[k].sum() / asked[k].sum()) for k, kind in enumerate(dataset.kinds)
                         if asked[k].sum()}
    for form, column in (("plain", 0), ("instructed", 1)):
        if asked[:, column].sum():
            result[form] = {kind: float(right[k, column] / asked[k, column]) for k, kind in enumerate(dataset.kinds)
                            if asked[k, column]}
    return result


# --- the task --------------------------------------------------------------------------------------
@dataclass
class VLMSettings:
    datamodule: FashionMNISTDataModule
    model: dict
    vision: str
    optim: VLMOptim
    instructed: float
    eval_images: int | None
    checkpoint: dict


def check(cfg: DictConfig, overrides: list[str] | None) -> VLMSettings:
    from tokenreduce.models.fmnist_vlm import VISION_INITS, model_config

    d = plain(cfg.get("vlm")) or {}
    check_keys("vlm", d, KEYS)
    optim_cfg = d.get("optim") or {}
    check_keys("vlm.optim", optim_cfg, VLMOptim.settings())
    checkpoint = plain(cfg.checkpoint)
    check_loss_monitor(checkpoint, "train_vlm")
    check_training_length(plain(cfg.trainer))
    check_loggers(plain(cfg.logger))
    model = d.get("model") or {}
    model_config(**model)
    vision = d.get("vision", "fmnist_vit")
    if vision not in VISION_INITS:
        raise ConfigError(f"vlm.vision={vision!r} is invalid; allowed: {', '.join(VISION_INITS)}")
    optim = VLMOptim(**optim_cfg)
    instructed = d.get("instructed", 0.5)
    check_number("vlm", "instructed", instructed, low=0, high=1)
    datamodule = build_datamodule(cfg.data)
    if not isinstance(datamodule, FashionMNISTDataModule):
        raise ConfigError(f"data={cfg.data.get('name')} is invalid for task=train_vlm; allowed: fashion_mnist")
    if datamodule.scaling not in ("auto", "pad"):
        raise ConfigError(f"data.scaling={datamodule.scaling!r} is invalid for task=train_vlm; allowed: auto, pad "
                          "(the model's processor pads the 28x28 images to 32x32)")
    # the final evaluation comes after the training: a bad setting of it must fail now
    eval_images = d.get("eval_images")
    held_out = datamodule.val_size or (datamodule.test_samples or 10_000)
    if eval_images is not None:
        check_number("vlm", "eval_images", eval_images, low=1, high=held_out, integer=True)
    datamodule.shuffle_seed = cfg.seed
    datamodule.check("fit")
    return VLMSettings(datamodule, model, vision, optim, instructed, eval_images, checkpoint)


def run(context: RunContext, settings: VLMSettings):
    from tokenreduce.models.fmnist_vlm import (
        QuestionEncoder,
        create_fmnist_vlm,
        model_config,
        weights_metadata,
        weights_state,
    )

    cfg, output_dir = context.cfg, Path(context.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = create_fmnist_vlm(settings.vision, **settings.model)
    model_cfg = model_config(**settings.model)  # in full, saved with the weights
    data = QuestionData(settings.datamodule, QuestionEncoder(), settings.instructed, seed=cfg.seed)
    data.shuffle_seed = cfg.seed
    module = VLMModule(model, settings.optim, model_cfg)
    started = time.monotonic()
    with step_trainer(context, settings.checkpoint, cfg.get("run_name") or "fmnist_vlm") as trainer:
        fit(trainer, module, data, context)
        if not trainer.is_global_zero:
            return None
        trained_s = time.monotonic() - started
        tell("train_vlm: answering the held-out questions by greedy generation")
        generated = generation_accuracy(module.model, data, data.val_set, settings.eval_images,
                                        settings.datamodule.eval_batch_size)
        save_state_dict(weights_state(module.model), output_dir / WEIGHTS_FILE, weights_metadata(model_cfg))
        record = {"task": "train_vlm", "global_step": trainer.global_step,
                  "train_loss": logged(trainer, "train/loss"), "val_loss": logged(trainer, "val/loss"),
                  "val_accuracy": logged(trainer, "val/accuracy"), "val_step": module.validated_at,
                  "generation": generated,
                  "num_params": sum(p.numel() for p in model.parameters()), "model": model_cfg,
                  "vision": settings.vision, "checkpoints": checkpoints_of(trainer), "weights": WEIGHTS_FILE,
                  "seed": cfg.seed, "train_seconds": round(trained_s, 1),
                  "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        write_new(output_dir / RECORD, json.dumps(record, indent=2, default=str))
        by_kind = ", ".join(f"{k} {v:.4f}" for k, v in generated["by_kind"].items())
        tell(f"train_vlm: step {record['global_step']}, val/loss {record['val_loss']}; greedy answers on "
             f"{generated['questions']} held-out questions: {by_kind}")
        return VLMRecord(record)


@dataclass(frozen=True)
class VLMRecord:
    """What a run wrote to `vlm.json`."""

    values: dict
    top1 = None  # no classification metric: nothing for a sweep to optimise


TASK = register_task(Task(name="train_vlm", check=check, run=run,
                          unused=("model", "optim", "loss", "measure", "reducer", "text_reducer", *ONE_MODEL),
                          reads="vlm.* (model, vision, optim, instructed, eval_images)"))
