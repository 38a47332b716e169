"""The Lightning module around a reduced timm model: evaluation metrics and fine-tuning."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import lightning as L
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

from tokenreduce.engine.losses import LossContext, check_weight_names, reducer_loss_terms, weigh
from tokenreduce.engine.metrics import topk_accuracy
from tokenreduce.errors import ConfigError


@dataclass
class OptimSettings:
    """AdamW with linear warm-up then cosine decay, stepped every optimizer step."""

    lr: float = 5e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = None
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6

    def __post_init__(self):
        for key in ("lr", "weight_decay", "warmup_lr", "min_lr", "warmup_epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"optim.{key}={value!r} is invalid; allowed: a number >= 0")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr!r} is invalid; allowed: a number > 0")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps!r} is invalid; allowed: null or an integer >= 0")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay={self.layer_decay!r} is invalid; allowed: null or a number in (0, 1]")
        self.betas = tuple(self.betas)


@dataclass
class LossSettings:
    """Cross-entropy with label smoothing, timm mixup/cutmix, and the reducer's own loss terms."""

    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    reducer_losses: bool = True
    reducer_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing={self.label_smoothing!r} is invalid; allowed: a number in [0, 1)")
        for key in ("mixup", "cutmix"):
            if getattr(self, key) < 0:
                raise ConfigError(f"loss.{key}={getattr(self, key)!r} is invalid; allowed: an alpha >= 0 (0 is off)")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ConfigError(f"loss.mixup_mode={self.mixup_mode!r} is invalid; allowed: batch, pair, elem")
        self.reducer_weights = dict(self.reducer_weights or {})

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """The learning rate at optimizer step `step` (0-based): linear from `warmup_lr` to `lr` over
    `warmup_steps`, then half a cosine from `lr` down to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


REDUCER_LOSS_PREFIX = "train/loss_"  # then a reducer's loss term, e.g. train/loss_consistency


def logged_metrics(num_classes: int | None = None) -> list[str]:
    """The metrics a fine-tune logs whatever its reducer (`ReductionModule`, `TokenStatsCallback`):
    what `checkpoint.monitor` may name (with Lightning's own epoch and step). top5 only with more than
    five classes (None: not known yet)."""
    evaluation = ["val/loss", "val/top1"] + (["val/top5"] if num_classes is None or num_classes > 5 else [])
    return [*evaluation, "val/gmacs", "val/tokens_out", "train/loss", "train/loss_main", "epoch", "step"]


class ReductionModule(L.LightningModule):
    """Evaluates and fine-tunes a model that `tokenreduce.apply` has reduced.

    Validation and test log `<stage>/loss`, `<stage>/top1` and `<stage>/top5`; training logs
    `train/loss` (the whole objective), `train/loss_main` and one `train/loss_<term>` per reducer term.
    """

    def __init__(self, model: nn.Module, num_classes: int, optim: OptimSettings | None = None,
                 loss: LossSettings | None = None):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.optim = optim or OptimSettings()
        self.loss_settings = loss or LossSettings()
        self.val_metrics = topk_accuracy(num_classes)
        self.test_metrics = topk_accuracy(num_classes)
        self.mixup = None
        ls = self.loss_settings
        if ls.mixes:
            self.mixup = Mixup(mixup_alpha=ls.mixup, cutmix_alpha=ls.cutmix, prob=ls.mixup_prob,
                               switch_prob=ls.mixup_switch_prob, mode=ls.mixup_mode,
                               label_smoothing=ls.label_smoothing, num_classes=num_classes)
            self.train_criterion = SoftTargetCrossEntropy()
        else:
            self.train_criterion = nn.CrossEntropyLoss(label_smoothing=ls.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()
        self._weights_checked = False
        self.start_step = 0

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    # --- training ----------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # after a resume the trainer has restored its step: record where this run started
        self.start_step = self.trainer.global_step
        # A resumed optimizer carries the learning rate of the run that saved it, computed for that
        # run's length. Make the rate a function of the step and this run's settings only.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                scheduler.base_lrs = [self.optim.lr] * len(scheduler.base_lrs)
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                               scheduler.lr_lambdas, strict=True):
                    group["initial_lr"] = base
                    group["lr"] = base * factor(scheduler.last_epoch)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels = batch
        targets = labels
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise ConfigError(f"mixup/cutmix need an even batch size, got {images.shape[0]}; set data.batch_size")
            images, targets = self.mixup(images, labels)
        tokens = self.model.forward_features(images)
        logits = self.model.forward_head(tokens)
        main = self.train_criterion(logits, targets)
        terms = {}
        if self.loss_settings.reducer_losses:
            patch = getattr(self.model, "_tokenreduce", None)
            context = LossContext(model=self.model, images=images, tokens=tokens, targets=targets, labels=labels,
                                  logits=logits,
                                  criterion=self.train_criterion, state=patch.last_state if patch else None)
            reported = reducer_loss_terms(context)
            if not self._weights_checked:
                reducer = getattr(self.model, "token_reducer", None)
                check_weight_names(self.loss_settings.reducer_weights, set(reported),
                                   getattr(reducer, "name", "none"))
                self._weights_checked = True
            terms = weigh(reported, self.loss_settings.reducer_weights)
        total = main + sum(terms.values()) if terms else main
        batch_size = images.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_main", main, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"{REDUCER_LOSS_PREFIX}{name}", value, batch_size=batch_size)
        return total

    def configure_optimizers(self):
        settings = self.optim
        optimizer = create_optimizer_v2(self.model, opt="adamw", lr=settings.lr, weight_decay=settings.weight_decay,
                                        betas=settings.betas, layer_decay=settings.layer_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self._warmup_steps(total)

        def factor_for(group: dict):
            # LambdaLR scales each group's initial lr (settings.lr); layer decay's per-group lr_scale
            # (timm) is applied here, since only timm's own schedulers read it
            scale = group.get("lr_scale", 1.0) / group["lr"]
            return lambda step: scale * warmup_cosine(step, total, warmup, settings.lr, settings.warmup_lr,
                                                      settings.min_lr)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(g) for g in optimizer.param_groups])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _warmup_steps(self, total: int) -> int:
        if self.optim.warmup_steps is not None:
            return self.optim.warmup_steps
        epochs = self.trainer.max_epochs
        if not self.optim.warmup_epochs or not epochs or epochs < 0:
            return 0
        return round(self.optim.warmup_epochs * total / epochs)

    # --- evaluation --------------------------------------------------------------------------
    def _evaluate(self, batch, stage: str, metrics) -> None:
        images, labels = batch
        logits = self.model(images)
        loss = self.eval_criterion(logits, labels)
        metrics.update(logits, labels)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=images.shape[0])
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, prog_bar=name == "top1", batch_size=images.shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)
