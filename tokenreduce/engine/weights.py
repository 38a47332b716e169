"""A run's weights from a Lightning checkpoint (`ckpt_path`): read without running code, and checked
against the model before any compute."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tokenreduce.errors import ConfigError

MODULE_PREFIX = "model."  # ReductionModule keeps the model as `model`
REDUCER_PREFIX = "token_reducer."  # a learned reducer's own weights (DynamicViT's predictors), inside the model


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of the Lightning checkpoint at `path` (`read_saved`)."""
    return read_saved(path)["state_dict"]


def read_saved(path: str | Path) -> dict:
    """The Lightning checkpoint at `path`, whole. It is read with `weights_only=True`
    (tensors and plain values only: a pickled object would run code) and memory-mapped, so a large
    file costs little here; a missing, truncated or foreign file is a ConfigError."""
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path}: no such checkpoint file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, not a torch file, a pickled object
        reason = " ".join(str(err).split()).split(". ")[0][:300]  # torch's first sentence says what is wrong
        raise ConfigError(f"ckpt_path={path}: cannot be read as a checkpoint ({type(err).__name__}: {reason}); "
                          "allowed: a checkpoint written by task=finetune") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise ConfigError(f"ckpt_path={path}: not a Lightning checkpoint (no state_dict); allowed: a checkpoint "
                          "written by task=finetune")
    return saved


def state_mismatch(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                   allow_missing=()) -> tuple[list[str], list[str], list[str]]:
    """The keys of `shapes` missing from `state` (but those in `allow_missing`), the keys of `state`
    not in `shapes`, and the keys in both whose shapes differ; each sorted."""
    missing = sorted(k for k in shapes if k not in state and k not in allow_missing)
    unexpected = sorted(k for k in state if k not in shapes)
    wrong = sorted(k for k in shapes if k in state and tuple(state[k].shape) != tuple(shapes[k]))
    return missing, unexpected, wrong


def weights_file(weights: str | Path | None, shipped: Path, model: str, experiment: str, given_as: str,
                 task: str) -> Path:
    """The weights file to load: `shipped` (the package's) when `weights` is None, else `weights`; a
    ConfigError naming what to give instead when it is not a file."""
    path = shipped if weights is None else Path(weights).expanduser()
    if not path.is_file():
        if weights is None:
            raise ConfigError(f"the {model} weights are not in this package ({path}); allowed: a checkpoint of "
                              f"experiment={experiment}, given as {given_as}")
        raise ConfigError(f"weights={str(weights)!r} is not a file; allowed: a safetensors state dict or a "
                          f"task={task} checkpoint (.ckpt)")
    return path


def check_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str | Path,
               model_name: str) -> None:
    """A ConfigError unless `state` has exactly the keys of `expected`, with the same shapes."""
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    missing, unexpected, wrong = state_mismatch(state, shapes)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                        f"{shapes[k]} in the model)")
    if problems:
        raise ConfigError(f"ckpt_path={path} does not fit model {model_name}: weights {'; '.join(problems)}; "
                          "allowed: a checkpoint of this model and reducer")


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, model_name: str) -> None:
    """Load a fine-tune's weights into the unreduced `model` (what task=compare and task=search
    start from): the checkpoint's model weights, without a learned reducer's own."""
    weights = {k.removeprefix(MODULE_PREFIX): v for k, v in state.items()
               if k.startswith(MODULE_PREFIX) and not k.startswith(MODULE_PREFIX + REDUCER_PREFIX)}
    check_fits(weights, model.state_dict(), path, model_name)
    model.load_state_dict(weights)
