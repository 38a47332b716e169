"""Training of a class-conditional diffusion model (`models/fmnist_diffusion.py`) with Lightning.

The loss is the mean squared error of the predicted noise at a uniformly drawn timestep. Each label is
replaced by the null class with probability `class_dropout`, so the same network learns the
unconditional prediction that classifier-free guidance needs. With `ema_decay` an exponential moving
average of the weights is kept (and checkpointed); validation and sampling use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tokenreduce.engine.module import warmup_cosine
from tokenreduce.errors import ConfigError, check_number
from tokenreduce.models.fmnist_diffusion import CONFIG, MODEL_CONFIG_KEY

DECAYS = ("constant", "cosine")


@dataclass
class DiffusionOptim:
    lr: float = 3.0e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 500  # linear from 0, then `decay`
    decay: str = "constant"  # or cosine: half a cosine down to min_lr at the run's last step
    min_lr: float = 0.0

    def __post_init__(self):
        check_number("diffusion.optim", "lr", self.lr, low=0, low_open=True)
        check_number("diffusion.optim", "weight_decay", self.weight_decay, low=0)
        check_number("diffusion.optim", "warmup_steps", self.warmup_steps, low=0, integer=True)
        if self.decay not in DECAYS:
            raise ConfigError(f"diffusion.optim.decay={self.decay!r} is invalid; allowed: {', '.join(DECAYS)}")
        check_number("diffusion.optim", "min_lr", self.min_lr, low=0, high=self.lr)
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"diffusion.optim.betas={self.betas!r} is invalid; allowed: two numbers in [0, 1)")
        self.betas = betas


def check_module_settings(class_dropout, ema_decay) -> None:
    check_number("diffusion", "class_dropout", class_dropout, low=0, high=1)
    if ema_decay is not None:
        check_number("diffusion", "ema_decay", ema_decay, low=0, high=1)
        if ema_decay == 1:
            raise ConfigError("diffusion: ema_decay=1 is invalid; allowed: a number in [0, 1), or null (no EMA)")


class DiffusionModule(L.LightningModule):
    """`model` (a DiTTransformer2DModel predicting epsilon) trained on (images in [-1, 1], labels)
    batches with the noise of `schedule` (a DDPMScheduler)."""

    def __init__(self, model, schedule, optim: DiffusionOptim | None = None, class_dropout: float = 0.1,
                 ema_decay: float | None = 0.999):
        super().__init__()
        check_module_settings(class_dropout, ema_decay)
        self.model = model
        self.schedule = schedule
        self.optim = optim or DiffusionOptim()
        self.class_dropout = class_dropout
        self.null_class = model.config.num_embeds_ada_norm
        self.ema = None
        if ema_decay is not None:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
            self.ema.requires_grad_(False)
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.clone().float(), persistent=False)

    @property
    def sampling_model(self):
        """The weights to sample with: the moving average when kept, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the architecture beside the weights, as plain values (the checkpoint is read weights-only)
        checkpoint[MODEL_CONFIG_KEY] = {k: v for k, v in dict(self.model.config).items() if k in CONFIG}

    def loss(self, model, images, labels, noise, timesteps):
        """Mean squared error of `model`'s noise prediction for `images` noised by `noise` at `timesteps`."""
        abar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(images.dtype)
        noisy = abar.sqrt() * images + (1 - abar).sqrt() * noise
        pred = model(noisy, timesteps, class_labels=labels, return_dict=False)[0]
        return F.mse_loss(pred.float(), noise.float())

    def training_step(self, batch, batch_idx):
        images, labels = batch
        n = len(images)
        drop = torch.rand(n, device=images.device) < self.class_dropout
        labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (n,), device=images.device)
        loss = self.loss(self.model, images, labels, noise, timesteps)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def validation_step(self, batch, batch_idx):
        # the same noise and timesteps at every validation, so the curve compares like with like
        images, labels = batch
        g = torch.Generator().manual_seed(batch_idx)
        noise = torch.randn(images.shape, generator=g).to(images)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(images),), generator=g).to(images.device)
        loss = self.loss(self.sampling_model, images, labels, noise, timesteps)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(images), sync_dist=True)

    def configure_optimizers(self):
        o = self.optim
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
        warmup = o.warmup_steps
        if o.decay == "cosine":
            total = int(self.trainer.estimated_stepping_batches)

            def factor(step: int) -> float:
                return warmup_cosine(step, total, warmup, o.lr, 0.0, o.min_lr) / o.lr
        else:
            def factor(step: int) -> float:
                return min(1.0, (step + 1) / (warmup + 1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
