"""Merge maps: which input patches ended in which output token, drawn over the input images.

`patch_colours` is the pure part (a source map in, one colour per patch out); `merge_maps` runs a
model with several reducers and draws the maps side by side.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from tokenreduce.adapters.base import facts_of
from tokenreduce.api import apply, reducer_of, remove, stats
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import available, create_reducer, reducer_defaults

COLOURINGS = ("mean", "palette")
DROPPED_GREY = (0.5, 0.5, 0.5)
_GOLDEN = 0.6180339887498949


def palette(num: int) -> np.ndarray:
    """`num` distinct saturated colours [num, 3]; neighbouring indices get far-apart hues."""
    rows = []
    for k in range(num):
        # golden-ratio hue steps never repeat a hue; saturation and value alternate so that close
        # hues still differ; saturation >= 0.55 keeps every colour away from the dropped grey
        sat = (0.9, 0.6, 0.75)[k % 3]
        val = (0.95, 0.75)[(k // 3) % 2]
        rows.append(colorsys.hsv_to_rgb((k * _GOLDEN) % 1.0, sat, val))
    return np.asarray(rows, dtype=np.float64).reshape(num, 3)


def _grid(grid_size) -> tuple[int, int]:
    ok = isinstance(grid_size, (tuple, list)) and len(grid_size) == 2
    ok = ok and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in grid_size)
    if not ok:
        raise ConfigError(f"grid_size={grid_size!r} is invalid; allowed: (rows, columns) of positive integers")
    return int(grid_size[0]), int(grid_size[1])


def token_grid(source, grid_size, num_prefix: int = 0) -> np.ndarray:
    """The output token of every patch, [rows, columns] int64, -1 where the patch was dropped.

    source:     one image's source map [N_in] (`tokenreduce.stats(model)["source"][i]`)
    grid_size:  (rows, columns) of the patch grid, `model.patch_embed.grid_size`
    num_prefix: class/register tokens in front of the patches, `model.num_prefix_tokens`
    """
    rows, cols = _grid(grid_size)
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ConfigError(f"num_prefix={num_prefix!r} is invalid; allowed: an integer >= 0")
    src = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    if src.ndim != 1 or not np.issubdtype(src.dtype, np.integer):
        raise ConfigError(
            f"source of shape {src.shape} and dtype {src.dtype} is invalid; allowed: one image's 1-D integer map"
        )
    if src.shape[0] != num_prefix + rows * cols:
        raise ConfigError(
            f"source has {src.shape[0]} tokens; allowed: num_prefix + rows * columns = "
            f"{num_prefix} + {rows} * {cols} = {num_prefix + rows * cols}"
        )
    if src.size and src.min() < -1:
        raise ConfigError(f"source holds {src.min()}; allowed: output token indices >= 0, or -1 for dropped")
    return src[num_prefix:].astype(np.int64).reshape(rows, cols)


def patch_colours(source, grid_size, image=None, num_prefix: int = 0, colouring: str = "mean",
                  dropped=DROPPED_GREY) -> np.ndarray:
    """One colour per patch, [rows, columns, 3] floats in [0, 1], from one image's source map.

    colouring: "mean"    every patch of an output token takes the token's mean image colour
                         (needs `image`, [H, W, 3] or [H, W] display values in [0, 1], H and W
                         multiples of the grid);
               "palette" every output token takes its own colour from `palette`, by token index.
    dropped:   the RGB colour of dropped (pruned) patches.
    """
    if colouring not in COLOURINGS:
        raise ConfigError(f"colouring={colouring!r} is invalid; allowed: {', '.join(map(repr, COLOURINGS))}")
    dropped = _rgb("dropped", dropped)
    tokens = token_grid(source, grid_size, num_prefix)
    rows, cols = tokens.shape
    ids = tokens.reshape(-1)
    kept = ids >= 0
    out = np.empty((ids.size, 3))
    out[~kept] = dropped
    if colouring == "palette":
        out[kept] = palette(int(ids.max()) + 1 if kept.any() else 0)[ids[kept]]
        return out.reshape(rows, cols, 3)
    cells = _cell_means(image, rows, cols).reshape(-1, 3)
    width = int(ids.max()) + 1 if kept.any() else 0
    sums = np.zeros((width, 3))
    np.add.at(sums, ids[kept], cells[kept])
    counts = np.bincount(ids[kept], minlength=width)
    out[kept] = sums[ids[kept]] / counts[ids[kept], None]
    return out.reshape(rows, cols, 3)


def _rgb(name: str, value) -> tuple[float, float, float]:
    ok = isinstance(value, (tuple, list)) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value)
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid; allowed: an RGB triple of numbers in [0, 1]")
    return tuple(float(v) for v in value)


def _cell_means(image, rows: int, cols: int) -> np.ndarray:
    """The mean colour of every patch of `image`, [rows, columns, 3]."""
    if image is None:
        raise ConfigError("image=None is invalid with colouring='mean'; allowed: an [H, W, 3] or [H, W] array")
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3 or img.shape[0] % rows or img.shape[1] % cols:
        raise ConfigError(
            f"image of shape {img.shape} is invalid for a {rows}x{cols} grid; allowed: [H, W, 3] or [H, W] "
            "with H a multiple of the rows and W of the columns"
        )
    h, w = img.shape[0] // rows, img.shape[1] // cols
    return img.reshape(rows, h, cols, w, 3).mean(axis=(1, 3))


# --- drawing --------------------------------------------------------------------------------
def merge_maps(model: nn.Module, images: torch.Tensor, reducers: Mapping[str, tuple[str, dict]], *,
               colouring: str = "mean", boundaries: bool = True, mean=None, std=None,
               cell_inches: float = 2.0) -> Figure:
    """Draw, for each image, the original and one merge map per reducer; return the Figure.

    model:     a timm VisionTransformer, reduced or not; it is left as it was (same reducer or
               none, same train/eval modes, same last-pass statistics)
    images:    the model's input [B, C, H, W], C = 1 (grey) or 3, normalised as the model expects
    reducers:  column label -> (reducer name, parameters); each runs with trace_source=True
    colouring: "mean" (each token in its mean image colour) or "palette" (a colour per token)
    boundaries: draw the borders between neighbouring patches of different tokens
    mean, std: the input normalisation to undo for display; default `model.pretrained_cfg`'s

    One row per image; dropped patches are grey and hatched. Column titles give the tokens left.
    """
    if colouring not in COLOURINGS:
        raise ConfigError(f"colouring={colouring!r} is invalid; allowed: {', '.join(map(repr, COLOURINGS))}")
    if not isinstance(boundaries, bool):
        raise ConfigError(f"boundaries={boundaries!r} is invalid; allowed: true or false")
    if isinstance(cell_inches, bool) or not isinstance(cell_inches, (int, float)) or not 0.2 <= cell_inches <= 20:
        raise ConfigError(f"cell_inches={cell_inches!r} is invalid; allowed: a number in [0.2, 20]")
    info = facts_of(model)
    grid = _check_images(model, images)
    shown = _display(model, images, mean, std)
    built = _build_reducers(reducers, info)
    sources, tokens = _run(model, images, built)
    return _draw(shown, grid, model.num_prefix_tokens, sources, tokens, colouring, boundaries, float(cell_inches))


def _check_images(model: nn.Module, images) -> tuple[int, int]:
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        raise ConfigError(f"merge maps need a model that embeds a fixed patch grid (patch_embed), which "
                          f"{type(model).__name__} has not; allowed: timm ViT/DeiT, Eva, BEiT and vit_relpos models")
    chans = embed.proj.in_channels
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0 or images.shape[1] != chans:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"images={shape} is invalid; allowed: a tensor [B >= 1, {chans}, H, W] (the model's input)")
    if chans not in (1, 3):
        raise ConfigError(f"the model takes {chans} input channels; allowed for display: 1 or 3")
    size = tuple(images.shape[2:])
    ph, pw = embed.patch_size
    if size[0] % ph or size[1] % pw:
        raise ConfigError(f"images of size {size} are invalid; allowed: multiples of the patch size {(ph, pw)}")
    if size == tuple(embed.img_size):
        return tuple(embed.grid_size)
    if not getattr(model, "dynamic_img_size", False):
        raise ConfigError(f"images of size {size} are invalid; allowed: the model's input size {tuple(embed.img_size)}")
    return size[0] // ph, size[1] // pw


def _channel_stats(name: str, value, chans: int) -> np.ndarray:
    values = np.asarray(value, dtype=np.float64).reshape(-1)
    if values.size == 1:
        return np.repeat(values, chans)
    if values.size == chans:
        return values
    if chans == 1 and values.size == 3:
        # a grey model built from an RGB config keeps the RGB statistics; their average stands in
        return values.mean(keepdims=True)
    raise ConfigError(
        f"{name}={tuple(values.tolist())} is invalid for {chans}-channel images; allowed: 1 or {chans} values"
    )


def _display(model: nn.Module, images: torch.Tensor, mean, std) -> np.ndarray:
    """The images as [B, H, W, 3] values in [0, 1]: normalisation undone, grey repeated to RGB."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = images.shape[1]
    mean = _channel_stats("mean", cfg.get("mean", (0.0,)) if mean is None else mean, chans)
    std = _channel_stats("std", cfg.get("std", (1.0,)) if std is None else std, chans)
    if not np.all(np.isfinite(mean)) or not np.all(np.isfinite(std)) or np.any(std <= 0):
        raise ConfigError(f"mean={tuple(mean)}, std={tuple(std)} are invalid; allowed: finite, std > 0")
    pixels = images.detach().float().cpu().numpy().transpose(0, 2, 3, 1) * std + mean
    if chans == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.clip(pixels, 0.0, 1.0)


def _build_reducers(reducers, info) -> dict:
    """Every reducer built and checked against the model before anything runs."""
    if not isinstance(reducers, Mapping) or not reducers:
        raise ConfigError(f"reducers={reducers!r} is invalid; allowed: a non-empty dict label -> (name, params)")
    tracing = [name for name in available() if "trace_source" in reducer_defaults(name)]
    built = {}
    for label, spec in reducers.items():
        if not isinstance(spec, (tuple, list)) or len(spec) != 2 or not isinstance(spec[1], Mapping):
            raise ConfigError(f"reducers[{label!r}]={spec!r} is invalid; allowed: (reducer name, params dict)")
        name, params = spec
        if name not in tracing:
            raise ConfigError(f"reducers[{label!r}]: reducer={name!r} is invalid; allowed: {', '.join(tracing)}")
        if params.get("trace_source", True) is not True:
            raise ConfigError(f"reducers[{label!r}]: trace_source={params['trace_source']!r} is invalid; allowed: true")
        reducer = create_reducer(name, **{**params, "trace_source": True})
        reducer.check_model(info)
        built[str(label)] = reducer
    return built


def _run(model: nn.Module, images: torch.Tensor, built: dict) -> tuple[dict, dict]:
    """The source map and output token count of every reducer; the model is restored after."""
    previous = reducer_of(model)
    last_state = model._tokenreduce.last_state if previous is not None else None
    modes = [(m, m.training) for m in model.modules()]
    param = next(model.parameters())
    x = images.to(device=param.device, dtype=param.dtype)
    sources, tokens = {}, {}
    try:
        model.eval()
        with torch.no_grad():
            for label, reducer in built.items():
                apply(model, reducer)
                model(x)
                st = stats(model)
                sources[label], tokens[label] = st["source"].cpu(), st["tokens"][-1]
    finally:
        if previous is None:
            remove(model)
        else:
            apply(model, previous)
            model._tokenreduce.last_state = last_state
        for module, training in modes:
            module.training = training
    return sources, tokens


def _draw(shown: np.ndarray, grid, num_prefix: int, sources: dict, tokens: dict, colouring: str,
          boundaries: bool, cell_inches: float) -> Figure:
    batch, height, width, _ = shown.shape
    cols = 1 + len(sources)
    fig = Figure(figsize=(cols * cell_inches, batch * cell_inches * height / width + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(batch, cols, squeeze=False)
    extent = (0, width, height, 0)
    for b in range(batch):
        axes[b, 0].imshow(shown[b], extent=extent, interpolation="nearest")
        for c, (label, source) in enumerate(sources.items(), start=1):
            ax = axes[b, c]
            image = shown[b] if colouring == "mean" else None
            colours = patch_colours(source[b], grid, image, num_prefix, colouring)
            ax.imshow(colours, extent=extent, interpolation="nearest")
            ids = token_grid(source[b], grid, num_prefix)
            _hatch_dropped(ax, ids, height, width)
            if boundaries:
                ax.add_collection(LineCollection(_borders(ids, height, width), colors="white", linewidths=0.7))
            if b == 0:
                ax.set_title(f"{label}\n{tokens[label]} tokens", fontsize=9)
        axes[0, 0].set_title(f"input\n{grid[0]}x{grid[1]} patches", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig


def _borders(ids: np.ndarray, height: int, width: int) -> list:
    """Line segments (pixel coordinates) between neighbouring patches of different tokens."""
    rows, cols = ids.shape
    ph, pw = height / rows, width / cols
    segments = []
    for i, j in zip(*np.nonzero(ids[:, 1:] != ids[:, :-1]), strict=True):
        x = (j + 1) * pw
        segments.append([(x, i * ph), (x, (i + 1) * ph)])
    for i, j in zip(*np.nonzero(ids[1:] != ids[:-1]), strict=True):
        y = (i + 1) * ph
        segments.append([(j * pw, y), ((j + 1) * pw, y)])
    return segments


def _hatch_dropped(ax, ids: np.ndarray, height: int, width: int) -> None:
    # the hatching tells a dropped patch apart from a token whose mean colour happens to be grey
    rows, cols = ids.shape
    ph, pw = height / rows, width / cols
    cells = [Rectangle((j * pw, i * ph), pw, ph) for i, j in zip(*np.nonzero(ids < 0), strict=True)]
    if cells:
        ax.add_collection(PatchCollection(cells, facecolor="none", edgecolor="0.35", hatch="////", linewidth=0))
