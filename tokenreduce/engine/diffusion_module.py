"""Training of a class-conditional diffusion model (`models/fmnist_diffusion.py`) with Lightning.

The loss is the mean squared error of the predicted noise at a uniformly drawn timestep. Each label is
replaced by the null class with probability `class_dropout`, so the same network learns the
unconditional prediction that classifier-free guidance needs. With `ema_decay` an exponential moving
average of the weights is kept (and checkpointed); validation and sampling use it.
"""

from __future__ import annotations

from typing import ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tokenreduce.engine.step_training import StepOptim, step_schedule
from tokenreduce.errors import ConfigError, check_number
from tokenreduce.models.fmnist_diffusion import CONFIG, MODEL_CONFIG_KEY


class DiffusionOptim(StepOptim):
    """`StepOptim` (AdamW, warm-up, then constant or cosine), refused as `diffusion.optim.*`."""

    SECTION: ClassVar[str] = "diffusion.optim"


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
        return {"optimizer": optimizer, "lr_scheduler": step_schedule(optimizer, o, self)}
