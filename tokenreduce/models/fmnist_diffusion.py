"""A class-conditional Fashion-MNIST diffusion model: a diffusers `DiTTransformer2DModel` in pixel space.

1-channel 28x28 images in [-1, 1], 2x2 patches (196 tokens), width 128 (4 heads of 32), 6 blocks, each
with attention, so the token reducers' defaults act on every block. Classes come in through DiT's
label embedding: `num_embeds_ada_norm` = 10 classes, and the extra row diffusers adds for
classifier-free guidance is the "null" class, index 10 (`NULL_CLASS`). The model predicts the noise
(epsilon). diffusers is imported inside the functions: `import tokenreduce` does not load it.
"""

from __future__ import annotations

from pathlib import Path

from tokenreduce.errors import ConfigError

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the label-embedding row of the unconditional prediction
CONFIG = dict(sample_size=28, in_channels=1, patch_size=2, num_attention_heads=4, attention_head_dim=32,
              num_layers=6, num_embeds_ada_norm=NUM_CLASSES)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear")
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} is invalid; allowed: an integer >= {low}")


def _with_defaults(who: str, defaults: dict, overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"{who}: {unknown[0]}={overrides[unknown[0]]!r} is not a setting; "
                          f"allowed: {', '.join(defaults)}")
    return {**defaults, **overrides}


def model_config(**overrides) -> dict:
    """`CONFIG` with `overrides`, checked (without building anything)."""
    cfg = _with_defaults("create_fmnist_diffusion", CONFIG, overrides)
    for key in CONFIG:
        _check_int(key, cfg[key], 1)
    if cfg["sample_size"] % cfg["patch_size"]:
        raise ConfigError(f"patch_size={cfg['patch_size']} is invalid for sample_size={cfg['sample_size']}; "
                          "allowed: a divisor of sample_size")
    return cfg


def create_fmnist_diffusion(**overrides):
    """A randomly initialised `DiTTransformer2DModel` of `CONFIG`, with `overrides` (e.g. a tiny one for
    tests: attention_head_dim=16, num_attention_heads=2, num_layers=2).

    diffusers' own label dropout (p=0.1, from the global RNG, in training mode) is turned off: the
    training module drops labels itself, with a probability it is given, and the null row stays."""
    cfg = model_config(**overrides)
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**cfg, out_channels=cfg["in_channels"])
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0  # the table keeps its null row; only the dropout goes
    return model


def schedule_config(**overrides) -> dict:
    """`SCHEDULE` with `overrides`, checked (without building anything)."""
    cfg = _with_defaults("noise_schedule", SCHEDULE, overrides)
    _check_int("num_train_timesteps", cfg["num_train_timesteps"], 2)
    if cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise ConfigError(f"beta_schedule={cfg['beta_schedule']!r} is invalid; allowed: {', '.join(BETA_SCHEDULES)}")
    return cfg


def noise_schedule(kind: str = "train", **overrides):
    """The noise schedule: diffusers' DDPMScheduler (`kind="train"`: adds noise for the loss) or
    DDIMScheduler (`kind="sample"`), epsilon prediction, `num_train_timesteps` steps (1000), betas
    `linear` (1e-4 to 0.02) or `cosine`. Predictions are clipped to [-1, 1], the pixels' range."""
    if kind not in ("train", "sample"):
        raise ConfigError(f"kind={kind!r} is invalid; allowed: train, sample")
    cfg = schedule_config(**overrides)
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDPMScheduler if kind == "train" else DDIMScheduler
    return cls(num_train_timesteps=cfg["num_train_timesteps"], beta_schedule=BETA_SCHEDULES[cfg["beta_schedule"]],
               prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)


WEIGHTS = Path(__file__).resolve().parent / "weights" / "fmnist_diffusion.safetensors"
MODEL_CONFIG_KEY = "model_config"  # where a train_diffusion checkpoint keeps the model's settings


def load_fmnist_diffusion(weights: str | Path | None = None, **overrides):
    """The model with trained weights, in eval mode: the weights shipped in the package (`WEIGHTS`,
    trained by `experiment=train_fmnist_diffusion`), or those of `weights`, a safetensors file of the
    model's state dict or a `task=train_diffusion` checkpoint (its EMA weights where it has them, as
    sampling uses; its architecture as saved with them). The architecture is `CONFIG`, or the
    checkpoint's, with `overrides`."""
    from tokenreduce.engine.weights import check_fits, weights_file

    path = weights_file(weights, WEIGHTS, "fmnist_diffusion", "train_fmnist_diffusion", "ckpt_path", "train_diffusion")

    state, saved_config = _read(path)
    model = create_fmnist_diffusion(**{**saved_config, **overrides})
    check_fits(state, model.state_dict(), path, "fmnist_diffusion")
    model.load_state_dict(state)
    return model.eval()


def _read(path: Path) -> tuple[dict, dict]:
    """The model's state dict in the file at `path`, and the architecture saved with it ({} if none)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path), {}
    from tokenreduce.engine.weights import read_saved

    saved = read_saved(path)
    state = saved["state_dict"]
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "model."
    config = saved.get(MODEL_CONFIG_KEY) or {}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, dict(config)
