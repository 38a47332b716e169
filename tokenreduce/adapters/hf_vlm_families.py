"""The vision-language model classes the hf_vlm adapter reduces, and what differs between them:
which language models their decoder layers may come from, a probe prompt with an image for the cost
functions, and the vision tower's MACs on the images a pass encoded.

- LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed-size image, one run of placeholders; all
  three placements (in the tower, at the boundary, in the language model).
- LLaVA-NeXT and LLaVA-OneVision (`LlavaNextForConditionalGeneration`,
  `LlavaOnevisionForConditionalGeneration`): the image tiled (a base view and the tiles of its
  best-fitting grid), the tiles' features unpadded and an `image_newline` token closing each row,
  all in one run of placeholders per image; placement (c) (inside the language model), which takes
  every one of those tokens, newline tokens included, as the visual tokens. LLaVA-NeXT with a CLIP
  tower also takes placement (b) (at the boundary): each view reduced on its own, the tiles' kept
  patches laid out in the image's grid (hf_vlm.tiled_layout), no unpadding and no newline tokens.
- Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`):
  images of any size cut into 2x2-merged patches, the language model's 3-D rotary positions (time,
  height, width) computed by the model for the full sequence; placement (c) carries each kept
  token's (cos, sin) and the decode steps keep the full sequence's numbering (FastV's rule).

The vision tower of the last four is counted, not derived: its MACs on a pass's images (videos) are
those FlopCounterMode counts on one run of `get_image_features` (`get_video_features`) on zeros of
the same shapes (`core.macs.counted_macs`), once per shape.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

from tokenreduce.adapters.hf_common import from_transformers, modeling
from tokenreduce.core.macs import counted_macs, linear_macs
from tokenreduce.errors import UnsupportedModelError

LLAVA = "LlavaForConditionalGeneration"
# model class -> the modeling module it comes from
FAMILIES = {
    LLAVA: "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
LLAVA_NEXT = "LlavaNextForConditionalGeneration"
QWEN = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
# language models whose decoder layers are Llama's (input_layernorm, q/k/v/o projections, rotary (cos,
# sin) applied as Llama applies them, grouped key-value heads): modeling module -> (model, layer, attention)
LANGUAGE_MODELS = {
    "llama": ("LlamaModel", "LlamaDecoderLayer", "LlamaAttention"),
    "mistral": ("MistralModel", "MistralDecoderLayer", "MistralAttention"),
    "qwen2": ("Qwen2Model", "Qwen2DecoderLayer", "Qwen2Attention"),
    "qwen2_vl": ("Qwen2VLTextModel", "Qwen2VLDecoderLayer", "Qwen2VLAttention"),
    "qwen2_5_vl": ("Qwen2_5_VLTextModel", "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLAttention"),
}
# the classes whose CLIP tower the boundary reducers read (placement (b)); why the others cannot
BOUNDARY_FAMILIES = (LLAVA, LLAVA_NEXT)
NO_BOUNDARY = {
    "LlavaOnevisionForConditionalGeneration": "its SigLIP vision tower has no CLS token, by whose attention "
                                              "VisionZip and PruMerge rank the patches",
    "Qwen2VLForConditionalGeneration": "its vision tower has no CLS token, by whose attention VisionZip and PruMerge "
                                       "rank the patches, and merges packed patches 2x2 before the language model",
}
NO_BOUNDARY["Qwen2_5_VLForConditionalGeneration"] = NO_BOUNDARY["Qwen2VLForConditionalGeneration"]
PROBE_GRID = 32  # a Qwen probe image's side in patches (448 px at Qwen's 14-px patches): 256 visual tokens


def family_of(cls: type) -> str | None:
    """The supported model class `cls` is (or derives from), by name; None for any other class."""
    if not from_transformers(cls):
        return None
    for name, module in FAMILIES.items():
        if issubclass(cls, getattr(modeling(module), name)):
            return name
    return None


def check_language_model(name: str, lm: nn.Module) -> None:
    """UnsupportedModelError unless `lm` is one of LANGUAGE_MODELS with its own layers and attention
    and no sliding-window layers (their caches drop old entries, which the kept indices cannot follow)."""
    allowed = ", ".join(classes[0] for classes in LANGUAGE_MODELS.values())
    found = next((module for module, classes in LANGUAGE_MODELS.items()
                  if type(lm) is getattr(modeling(module), classes[0])), None)
    if found is None:
        raise UnsupportedModelError(f"model {name} has a {type(lm).__name__} language model; supported: {allowed}")
    module = modeling(found)
    _, layer_cls, attention_cls = LANGUAGE_MODELS[found]
    bad = [i for i, layer in enumerate(lm.layers) if type(layer) is not getattr(module, layer_cls)
           or type(layer.self_attn) is not getattr(module, attention_cls)]
    if bad:
        raise UnsupportedModelError(f"model {name} has replaced decoder layers or attention at layers {bad}; "
                                    f"supported: transformers' {layer_cls} with {attention_cls}")
    kinds = getattr(lm.config, "layer_types", None)
    window = getattr(lm.config, "sliding_window", None)
    sliding = ([i for i, kind in enumerate(kinds) if kind != "full_attention"] if kinds
               else list(range(len(lm.layers))) if window is not None else [])
    if sliding:
        raise UnsupportedModelError(f"model {name} has sliding-window attention (sliding_window={window}) at layers "
                                    f"{sliding}; supported: full attention in every layer (sliding_window=None)")


def visual_token_ids(model: nn.Module) -> tuple[int, ...]:
    """The placeholder ids of images and of videos (those a model has)."""
    config = model.config
    return tuple(int(i) for i in (config.image_token_id, getattr(config, "video_token_id", None)) if i is not None)


# --- a probe prompt ------------------------------------------------------------------------------------
def probe_inputs(model: nn.Module, family: str) -> dict:
    """One prompt for a cost probe on a tiled or Qwen model: a seeded random image (tiled models: a
    square image of twice the tower's size, a 2x2 grid of tiles where the grid allows; Qwen: PROBE_GRID
    patches a side) and its run of placeholders between a few text tokens."""
    param = next(model.parameters())
    config = model.config
    generator = torch.Generator().manual_seed(0)
    image = {}
    if family in QWEN:
        vision = config.vision_config
        grid = torch.tensor([[1, PROBE_GRID, PROBE_GRID]])
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        image["pixel_values"] = torch.randn(PROBE_GRID ** 2, width, generator=generator)
        image["image_grid_thw"] = grid
        count = PROBE_GRID ** 2 // vision.spatial_merge_size ** 2
        run = [config.vision_start_token_id] + [config.image_token_id] * count + [config.vision_end_token_id]
    else:
        size = config.vision_config.image_size
        tiles = modeling("llava_next").image_size_to_num_patches(
            image_size=(2 * size, 2 * size), grid_pinpoints=config.image_grid_pinpoints, patch_size=size)
        image["pixel_values"] = torch.randn(1, tiles, config.vision_config.num_channels, size, size, generator=generator)
        image["image_sizes"] = torch.tensor([[2 * size, 2 * size]])
        with torch.inference_mode():  # the unreduced count: the placeholder run the processor would give
            features = own_features(model)(pixel_values=image["pixel_values"].to(param.device, param.dtype),
                                                 image_sizes=image["image_sizes"].to(param.device), return_dict=True)
        run = [config.image_token_id] * int(features.pooler_output[0].shape[0])
    special = set(visual_token_ids(model)) | {getattr(config.text_config, "pad_token_id", None)} | set(run)
    text = next(t for t in range(len(special) + 1) if t not in special)
    ids = torch.tensor([[text] * 4 + run + [text] * 8])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family in QWEN:
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).int()
    inputs.update(image)
    return {k: v.to(device=param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()}


# --- the vision tower's MACs -----------------------------------------------------------------------------
ENCODERS = {"get_image_features": "pixel_values", "get_video_features": "pixel_values_videos"}  # -> pixel argument


def recording_features(record, original):
    """`get_image_features` or `get_video_features` (`original`) that calls `record(inputs)` with
    what it was given (the pixel values' shape and dtype, and the tensors that size them) before
    running; the signature is kept (generate selects the arguments it passes by it)."""
    signature = inspect.signature(original)
    method = original.__name__
    name = ENCODERS[method]

    @functools.wraps(original)
    def encode(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        pixels = arguments.get(name)
        if isinstance(pixels, Tensor):
            sizes = {k: v.detach().clone() for k, v in arguments.items() if k != name and isinstance(v, Tensor)}
            record(VisionInputs(method=method, shape=tuple(pixels.shape), dtype=pixels.dtype, sizes=sizes))
        return original(*args, **kwargs)

    return encode


class VisionInputs:
    """The images or videos one call of `method` (get_image_features, get_video_features) encoded:
    the pixel values' shape and dtype, and the tensors that size them (image_sizes, image_grid_thw,
    video_grid_thw, ...)."""

    def __init__(self, method: str, shape: tuple, dtype: torch.dtype, sizes: dict[str, Tensor]):
        self.method, self.shape, self.dtype, self.sizes = method, shape, dtype, sizes

    def key(self) -> tuple:
        sizes = tuple((k, tuple(v.flatten().tolist())) for k, v in sorted(self.sizes.items()))
        return self.method, self.shape, self.dtype, sizes


def own_features(model: nn.Module, method: str = "get_image_features"):
    """The model's own `method` (get_image_features, get_video_features), not an override of the
    adapter's (which records its calls or reduces the features; each keeps the model's as `__wrapped__`)."""
    override = vars(model.model).get(method)  # the instance's; the class's own is decorated
    return getattr(model.model, method) if override is None else override.__wrapped__


def projector(model: nn.Module, family: str) -> nn.Module:
    """The module that maps the vision tower's features to the language model's width."""
    return model.model.visual.merger if family in QWEN else model.model.multi_modal_projector


def counted_vision_macs(model: nn.Module, family: str, inputs: VisionInputs) -> dict[str, int]:
    """MACs of get_image_features (get_video_features) on `inputs`' images (videos), as FlopCounterMode counts them
    on zeros of the same shapes, split into the projector's (its linear layers on the tokens it
    receives) and the rest (the vision tower: patch embedding, encoder layers, and for Qwen the
    patch merger's norm)."""
    param = next(model.parameters())
    tokens = []
    hook = projector(model, family).register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[:-1].numel()))
    pixels = torch.zeros(inputs.shape, dtype=inputs.dtype, device=param.device)
    sizes = {k: v.to(param.device) for k, v in inputs.sizes.items()}
    try:
        total = counted_macs(lambda: own_features(model, inputs.method)(**{ENCODERS[inputs.method]: pixels}, **sizes))
    finally:
        hook.remove()
    rows = sum(tokens)
    if family in QWEN:  # the merger reads its input's patches in groups of merge^2, one group per token
        rows //= model.config.vision_config.spatial_merge_size ** 2
    projected = rows * linear_macs(projector(model, family))
    return {"vision_tower": total - projected, "projector": projected}
