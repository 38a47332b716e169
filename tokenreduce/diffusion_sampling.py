"""DDIM sampling with classifier-free guidance for a class-conditional DiT (`models/fmnist_diffusion.py`).

Each step runs the conditional and the unconditional (null-class) halves as one batch of 2B, the
layout tomesd's guidance handling expects, and combines the two noise predictions. Sample i draws
all its noise (start and, with eta > 0, each step's) from its own generator seeded `seed + i`, so a
sample does not depend on the others in its batch: `sample(m, cs, seed=s)[i]` equals
`sample(m, cs[i:i+1], seed=s+i)[0]`. diffusers is imported inside the function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.errors import ConfigError


def _check_classes(classes, num_classes: int) -> Tensor:
    labels = torch.as_tensor(classes)
    if labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ConfigError(f"classes={classes!r} is invalid; allowed: a non-empty 1-D sequence of integer class "
                          f"indices in [0, {num_classes})")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ConfigError(f"classes holds {int(bad[0])}, which is invalid; allowed: class indices in "
                          f"[0, {num_classes})")
    return labels.long()


@torch.no_grad()
def sample(model, classes, steps: int = 50, guidance: float = 4.0, seed: int = 0, eta: float = 0.0,
           scheduler=None) -> Tensor:
    """Images [B, C, H, W] in [-1, 1] of `classes` (B class indices), by `steps` DDIM steps of `model`
    (a DiTTransformer2DModel whose null class is its `num_embeds_ada_norm`).

    guidance: the classifier-free guidance scale w, eps = eps_null + w * (eps_class - eps_null); 1 is
    the conditional prediction alone, 0 the unconditional one. eta: DDIM's stochasticity (0:
    deterministic given the start noise, 1: DDPM-like). scheduler: a DDIMScheduler (default:
    `noise_schedule("sample")`); its timesteps are set here. Each step clips the predicted clean
    image to the scheduler's range and steps with the noise that agrees with the clipped image
    (DDIM's `use_clipped_model_output`)."""
    config = model.config
    num_classes = config.num_embeds_ada_norm
    labels = _check_classes(classes, num_classes)
    if scheduler is None:
        from tokenreduce.models.fmnist_diffusion import noise_schedule

        scheduler = noise_schedule("sample")
    total = scheduler.config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise ConfigError(f"steps={steps!r} is invalid; allowed: an integer from 1 to {total} (the schedule's "
                          "training timesteps)")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0 \
            or guidance == float("inf"):
        raise ConfigError(f"guidance={guidance!r} is invalid; allowed: a finite number >= 0 (1: no guidance)")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ConfigError(f"eta={eta!r} is invalid; allowed: a number from 0 to 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid; allowed: an integer >= 0")

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    batch = len(labels)
    shape = (config.in_channels, config.sample_size, config.sample_size)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]

    def noise() -> Tensor:  # drawn on the CPU, so a seed gives the same noise on any device
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)

    was_training = model.training
    model.eval()
    try:
        scheduler.set_timesteps(steps)
        x = noise() * scheduler.init_noise_sigma
        both = torch.cat([labels, torch.full_like(labels, num_classes)]).to(device)
        for t in scheduler.timesteps:
            timestep = torch.full((2 * batch,), int(t), device=device, dtype=torch.long)
            eps = model(torch.cat([x, x]), timestep, class_labels=both, return_dict=False)[0]
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
            variance = noise() if eta > 0 else None
            # the noise recomputed from the clipped clean-image prediction, so the step heads for the
            # image it clipped to: with the raw noise, guidance above 1 drove samples into saturated
            # textures (fmnist_diffusion at w=2: 0.42 of 100 samples recognised, against 0.92 with this)
            x = scheduler.step(eps, t, x, eta=eta, use_clipped_model_output=True, variance_noise=variance).prev_sample
    finally:
        model.train(was_training)
    return x.clamp(-1, 1)
