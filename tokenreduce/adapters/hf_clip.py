"""Placing a reducer into the image towers of Hugging Face `transformers` (>= 5) CLIP and SigLIP:
`CLIPVisionModel`, `CLIPVisionModelWithProjection`, `SiglipVisionModel`, and the vision tower of the
dual encoders `CLIPModel` and `SiglipModel`. The text towers (`CLIPTextModel`,
`CLIPTextModelWithProjection`, `SiglipTextModel`, and a dual encoder's `text_model`) are hf_clip_text's:
a dual encoder's text tower is reduced by applying a reducer to its `text_model`, independently.

The vision tower (`CLIPVisionModel` / `SiglipVisionModel`, the model itself or its `vision_model`)
gets a `forward` with its own signature and output class; the loop over its encoder layers is
hf_vit's (the block loop `run_blocks`), each layer running as transformers defines it (with the
proportional-attention bias as its attention mask) or through its reducer in the steps of
`TowerLayerOps`, between the layer's attention residual and its MLP. The models around the tower
keep their own `forward`, `get_image_features` and `get_text_features`: they call the tower as
before, so the projection, the text tower and the logits are transformers' own.

CLIP: embeddings (class token first), `pre_layrnorm`, the layers, then the class token through
`post_layernorm` is the pooled output; the class token is the one prefix token. SigLIP: no class
token (no prefix token); `post_layernorm` over all tokens, then `SiglipMultiheadAttentionPoolingHead`
(a learned probe attending over the tokens), which sees each token's size as the proportional-
attention log-size bias on its keys, as timm_vit's `weighted_pool` does for timm's attention pooling.

The reducer is held by the model it was applied to; a tower inside a dual encoder or a projection
model reaches it through a link set while the model is patched, and `remove` takes both back (the
text adapter places its towers the same way).

`output_hidden_states` may select hidden states by index (an int or a list of ints, as transformers'
`select_hidden_states` passes a LLaVA's `vision_feature_layer` to its tower): the tuple of depth + 1
entries holds the selected ones (the tokens leaving that layer, merged ones as plain features) and
None elsewhere, as transformers gives it; `True` (every layer) stays refused.

`transformers` is imported only when a model's class comes from it (as in hf_vit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import ModelInfo, is_patched, register_adapter
from tokenreduce.adapters.blocks import run_blocks
from tokenreduce.adapters.hf_common import (
    INSTALL_HINT,
    PASSED,
    REFUSED_OUTPUTS,
    HFAdapterBase,
    HFLayerOps,
    LayerLoop,
    bind,
    block_costs,
    check_attention_implementation,
    check_layer_types,
    family_class,
    from_transformers,
    import_transformers,
    modeling,
    spec_of,
)
from tokenreduce.core.macs import linear_macs, macs_parts
from tokenreduce.core.state import LayerRecord, ReductionState
from tokenreduce.errors import ConfigError, UnclaimedModelError, UnsupportedModelError

# transformers' model family (its module under transformers.models) -> the prefix of its class names
FAMILIES = {"clip": "CLIP", "siglip": "Siglip"}
# supported class -> (family, kind): "tower" the vision tower itself, "projection" the tower and its
# visual projection, "dual" the vision tower of an image-text model (the text tower unreduced)
SUPPORTED = {
    "CLIPVisionModel": ("clip", "tower"),
    "CLIPVisionModelWithProjection": ("clip", "projection"),
    "CLIPModel": ("clip", "dual"),
    "SiglipVisionModel": ("siglip", "tower"),
    "SiglipModel": ("siglip", "dual"),
}
TOWERS = ("CLIPVisionModel", "SiglipVisionModel")
# the text classes, claimed by the text adapter (hf_clip_text), so that one adapter claims each class
TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "SiglipTextModel")
MODULES = ("transformers.modeling_outputs", *(f"transformers.models.{f}.modeling_{f}" for f in FAMILIES))
TEXT_REASON = ("this adapter reduces image towers; a text tower is reduced by the CLIP/SigLIP text adapter "
               "(hf_clip_text): apply the reducer to the text model itself, e.g. tokenreduce.apply(model.text_model, "
               "...) for a dual encoder")


def _family_class(cls: type) -> type | None:
    """The CLIP or SigLIP model class `cls` is (or derives from), or None."""
    return family_class(cls, FAMILIES)


def _claimed_class(cls: type) -> type | None:
    """The CLIP or SigLIP class `cls` is, unless it is a text class (those are hf_clip_text's)."""
    found = _family_class(cls)
    return None if found is None or found.__name__ in TEXT_CLASSES else found


def _spec(model: nn.Module) -> tuple[str, str]:
    """(family, kind) of a claimed model, from its original class."""
    return spec_of(model, SUPPORTED, _family_class)


def _tower(model: nn.Module, kind: str) -> nn.Module:
    """The vision tower (CLIPVisionModel / SiglipVisionModel): the model itself or its `vision_model`."""
    return model if kind == "tower" else getattr(model, "vision_model", None)


def tower_of(model: nn.Module) -> nn.Module:
    """The vision tower of a claimed model."""
    return _tower(model, _spec(model)[1])


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not (a CLIP or
    SigLIP class that it does not support: UnclaimedModelError, which is also a ConfigError)."""
    cls = _family_class(type(model)) if from_transformers(type(model)) else None
    if cls is None:
        raise UnsupportedModelError(f"model {type(model).__name__} is not a Hugging Face transformers CLIP or SigLIP "
                                    f"model; supported: {', '.join(SUPPORTED)}")
    supported = ", ".join(SUPPORTED)
    if cls.__name__ not in SUPPORTED:
        if "Text" in cls.__name__:
            raise UnclaimedModelError(f"model {type(model).__name__} ({cls.__name__}) is a text tower: {TEXT_REASON}; "
                                      f"supported: {supported} (their image towers)")
        raise UnclaimedModelError(f"model {type(model).__name__} ({cls.__name__}) is not supported by the CLIP/SigLIP "
                                  f"adapter; supported: {supported}")
    family, kind = SUPPORTED[cls.__name__]
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    tower = _tower(model, kind)
    parts = ("embeddings", "encoder", "post_layernorm") + (("pre_layrnorm",) if family == "clip" else ())
    layers = check_tower(model, name, tower, family, "vision", parts)
    if family == "siglip" and tower.use_head:
        head = tower.head
        if (type(head) is not modeling(family).SiglipMultiheadAttentionPoolingHead
                or not isinstance(head.attention, nn.MultiheadAttention) or not head.attention.batch_first
                or not head.attention._qkv_same_embed_dim):
            raise UnsupportedModelError(f"model {name} pools with {type(head).__name__}; supported: "
                                        "SiglipMultiheadAttentionPoolingHead (a batch-first nn.MultiheadAttention)")
    check_attention_implementation(name, tower.config)
    clip = family == "clip"
    return ModelInfo(name=name, depth=len(layers), num_prefix=int(clip), has_class_token=clip,
                     embed_dim=tower.config.hidden_size, num_heads=tower.config.num_attention_heads)


def check_tower(model: nn.Module, name: str, tower: nn.Module | None, family: str, side: str,
                parts: tuple[str, ...]) -> nn.ModuleList:
    """The layers of `model`'s `side` tower ("vision" or "text": the model itself or its `<side>_model`),
    checked: a tower of the family's class, not reduced on its own, with `parts` and encoder layers of
    the family's classes; UnsupportedModelError naming what is not."""
    module, prefix = modeling(family), FAMILIES[family]
    tower_cls = getattr(module, f"{prefix}{side.capitalize()}Model")
    if tower is None or not isinstance(tower, tower_cls):
        raise UnsupportedModelError(f"model {name} ({type(model).__name__}) has no {tower_cls.__name__} as its "
                                    f"{side}_model; install {INSTALL_HINT}")
    if tower is not model and is_patched(tower):
        raise UnsupportedModelError(f"model {name}: its {side}_model already carries a reducer; call "
                                    f"tokenreduce.remove(model.{side}_model) first")
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if layers is None or any(getattr(tower, p, None) is None for p in parts):
        raise UnsupportedModelError(f"model {name} ({type(model).__name__}) lacks the layout of transformers>=5 "
                                    f"({', '.join(parts)}, encoder.layers); install {INSTALL_HINT}")
    check_layer_types(name, layers, getattr(module, f"{prefix}EncoderLayer"), getattr(module, f"{prefix}Attention"),
                      attention_of=lambda layer: getattr(layer, "self_attn", None))
    return layers


# --- one layer -------------------------------------------------------------------------------------
class TowerLayerOps(HFLayerOps):
    """The steps of a CLIP/SigLIP encoder layer (layer_norm1, self_attn with q/k/v/out projections,
    residual, layer_norm2, MLP, residual) for a reducer. `plain`, the attention interface, the heads
    and checkpointing are hf_vit's."""

    def __init__(self, layer: nn.Module, checkpointing: bool = False):
        self.layer = layer
        self.attn = layer.self_attn  # the module the attention interface is called with
        self.dinov2 = False
        self.checkpointing = checkpointing
        self.projections = (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj)
        self.out, self.head_dim = self.attn.out_proj, self.attn.head_dim
        self.scaling, self.dropout = self.attn.scale, self.attn.dropout
        self.attention_block, self.mlp_modules = layer.self_attn, (layer.mlp,)

    def mlp(self, x: Tensor) -> Tensor:
        layer = self.layer
        return self._run(lambda t: t + layer.mlp(layer.layer_norm2(t)), x)

    def attn_input(self, x: Tensor) -> Tensor:
        return self.layer.layer_norm1(x)

    def attn_residual(self, x: Tensor, y: Tensor) -> Tensor:
        return x + y


# --- pooling ---------------------------------------------------------------------------------------
def attention_pool(head: nn.Module, x: Tensor, sizes: Tensor | None, prop_attn: bool) -> Tensor:
    """SigLIP's `SiglipMultiheadAttentionPoolingHead` over tokens [B, N, C] of sizes [B, N, 1]: the probe
    attends with log(size) added to every key's logit (proportional attention); without sizes (or
    without proportional attention) the head as transformers runs it."""
    if sizes is None or not prop_attn:
        return head(x)
    attention = head.attention
    bias = sizes[..., 0].log().clamp_min(torch.finfo(x.dtype).min).to(x.dtype)  # [B, N]
    mask = bias[:, None, :].repeat_interleave(attention.num_heads, dim=0)  # [B * heads, 1, N], batch-major
    probe = head.probe.repeat(x.shape[0], 1, 1)
    h = attention(probe, x, x, attn_mask=mask)[0]
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]


# --- the patched tower -----------------------------------------------------------------------------
@dataclass
class _Link:
    """What a tower inside another model keeps while that model is patched: the model (which holds the
    reducer and the pass's state) and the tower's own class. Kept in the tower's __dict__, not as a
    submodule, so the model's parameters and state dict are unchanged."""

    owner: nn.Module
    original_class: type


def owner_of(tower: nn.Module) -> nn.Module:
    """The model that holds a tower's reducer: the model the tower belongs to, or the tower itself."""
    link = tower.__dict__.get("_tr_link")
    return tower if link is None else link.owner


def _check_arguments(owner: nn.Module, tower: nn.Module, arguments: dict, extra: dict) -> None:
    """Refuse, before any compute, what a reduced pass cannot give, naming the argument."""
    who = f"token-reduced {owner._tokenreduce.original_class.__name__}"
    for name in REFUSED_OUTPUTS:
        value = extra.get(name)
        if name == "output_hidden_states" and selected_layers(value, len(tower.encoder.layers), who) is not None:
            continue  # some layers' hidden states, as LLaVA asks for its feature layer: given (merged)
        if value is None:
            value = getattr(tower.config, name, False) or getattr(owner.config, name, False)
        if value:
            raise ConfigError(
                f"{name}={value!r} is not supported on a {who}: the vision layers hold fewer tokens after each "
                f"reduction (and the attention of merged tokens is not the model's); allowed: {name}=False (and "
                f"config.{name}=False), or call tokenreduce.remove(model) first")
    unknown = sorted(set(extra) - set(PASSED) - set(REFUSED_OUTPUTS))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} not supported on the vision tower of a {who}; allowed: pixel_values, "
                          "interpolate_pos_encoding and return_dict (and the text inputs of a dual encoder)")
    if arguments.get("pixel_values") is None:
        raise ConfigError(f"pixel_values=None is invalid for a {who}; allowed: a [B, C, H, W] tensor")


def selected_layers(value, depth: int, who: str) -> list[int] | None:
    """The hidden-state indices (0: the embeddings, j: the output of layer j - 1; negative from the end,
    as a tuple of depth + 1 entries is indexed) that `output_hidden_states` selects when it is an int or
    a list of ints (as transformers' `select_hidden_states` passes a LLaVA's `vision_feature_layer` to
    its tower); None when it is not such a selection (a bool or None). An index out of range:
    ConfigError."""
    if isinstance(value, bool) or value is None:
        return None
    items = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    if not items or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise ConfigError(f"output_hidden_states={value!r} is not supported on a {who}; allowed: False, an int or a "
                          f"non-empty list of ints in -{depth + 1} .. {depth} (the hidden states to return)")
    bad = [i for i in items if not -(depth + 1) <= i <= depth]
    if bad:
        raise ConfigError(f"output_hidden_states={value!r}: indices {bad} are out of range for {depth} layers; "
                          f"allowed: -{depth + 1} .. {depth}")
    return sorted({i % (depth + 1) for i in items})


class _ReducedTower:
    """Methods placed in front of the vision tower's own class (CLIPVisionModel, SiglipVisionModel) while
    the model is patched (the adapter adds a `forward` that keeps the class's own signature and calls
    `_tr_forward`)."""

    def _tr_forward(self, original, *args, **kwargs):
        arguments, extra = bind(original, self, args, kwargs)
        owner = owner_of(self)
        _check_arguments(owner, self, arguments, extra)
        clip = hasattr(self, "pre_layrnorm")
        x = self.embeddings(arguments["pixel_values"], interpolate_pos_encoding=arguments.get("interpolate_pos_encoding"))
        if clip:
            x = self.pre_layrnorm(x)
        layers = self.encoder.layers
        checkpointing = bool(layers[0].gradient_checkpointing) and layers[0].training
        loop = LayerLoop(owner.token_reducer, owner._tokenreduce.info.num_prefix, layers, checkpointing, TowerLayerOps)
        selected = selected_layers(extra.get("output_hidden_states"), len(layers), "")
        embedded = x
        x, state, taken = run_blocks(loop, x, None, take=None if selected is None else {j - 1 for j in selected})
        owner._tokenreduce.last_state = state
        if clip:  # the class token through post_layernorm; the sequence is the encoder's output
            sequence, pooled = x, self.post_layernorm(x[:, 0, :])
        else:
            sequence = self.post_layernorm(x)
            pooled = (attention_pool(self.head, sequence, state.sizes, owner.token_reducer.prop_attn)
                      if self.use_head else None)
        hidden_states = None
        if selected is not None:  # the selected entries (the merged tokens, without their sizes); None elsewhere
            entries = iter(taken)
            chosen = {j: embedded if j == 0 else next(entries) for j in selected}
            hidden_states = tuple(chosen.get(j) for j in range(len(layers) + 1))
        output = import_transformers("transformers.modeling_outputs").BaseModelOutputWithPooling(
            last_hidden_state=sequence, pooler_output=pooled, hidden_states=hidden_states)
        return_dict = extra.get("return_dict")
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


class _ReducedHolder:
    """Placed in front of the class of a model that holds a reduced tower (CLIPModel, SiglipModel,
    CLIPVisionModelWithProjection, CLIPTextModelWithProjection): its own methods run unchanged and call
    the tower."""


# --- cost --------------------------------------------------------------------------------------
def attention_pool_macs(head: nn.Module, tokens: int) -> int:
    """MACs of SigLIP's pooling head over `tokens` tokens: the probe's query, keys and values of every
    token, the probe's attention over them, the output projection and the MLP of the probe."""
    dim = head.attention.embed_dim
    return dim * dim + tokens * 2 * dim * dim + 2 * tokens * dim + linear_macs(head.attention.out_proj) + \
        linear_macs(head.mlp)


def pass_macs(model: nn.Module, state: ReductionState) -> dict[str, int]:
    """MACs of one image through the vision tower (and the visual projection) for the pass that left
    `state`; a dual encoder's text tower and logits are not counted."""
    family, kind = _spec(model)
    tower = _tower(model, kind)
    num_patches = state.records[0].tokens_in - model._tokenreduce.info.num_prefix
    head = attention_pool_macs(tower.head, state.final_tokens) if family == "siglip" and tower.use_head else 0
    projection = getattr(model, "visual_projection", None)
    head += 0 if projection is None else linear_macs(projection)
    return _tower_parts(tower, num_patches, state.records, head)


def unreduced_tower_macs(tower: nn.Module) -> dict[str, int]:
    """MACs of one image through a CLIP tower's embedding and every encoder layer, unreduced (as a
    model that reads its hidden states runs it: no pooling head)."""
    config = tower.config
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1  # CLIP's class token
    records = [LayerRecord(tokens_attn=tokens, tokens_mlp=tokens, tokens_in=tokens) for _ in tower.encoder.layers]
    return _tower_parts(tower, patches, records, head=0)


def _tower_parts(tower: nn.Module, num_patches: int, records: list[LayerRecord], head: int) -> dict[str, int]:
    embed = num_patches * tower.embeddings.patch_embedding.weight.numel()
    costs = block_costs(tower.encoder.layers, tower.config.hidden_size, TowerLayerOps)
    return macs_parts(embed, costs, records, head)


@register_adapter("hf_clip")
class HFCLIPAdapter(HFAdapterBase):  # the tower's forward keeps its signature
    family = (f"Hugging Face transformers CLIP and SigLIP image towers ({', '.join(SUPPORTED)}; the text towers: "
              "hf_clip_text)")
    reduced_methods = _ReducedTower
    towers = TOWERS  # the classes that get a forward of their own; the others hold one of them
    tower_of = staticmethod(tower_of)

    # every model of these families but the text classes, so a class it does not support is refused
    # with the reason
    claimed_class = staticmethod(_claimed_class)
    model_info = staticmethod(describe)
    model_macs = staticmethod(pass_macs)
    unreduced_macs = staticmethod(unreduced_tower_macs)

    def patch(self, model: nn.Module, reducer, info: ModelInfo, options: dict) -> None:
        super().patch(model, reducer, info, options)
        tower = self.tower_of(model)
        if tower is not model:
            object.__setattr__(tower, "_tr_link", _Link(owner=model, original_class=type(tower)))
            tower.__class__ = self._reduced_class(type(tower))

    def unpatch(self, model: nn.Module) -> None:
        tower = self.tower_of(model)
        link = tower.__dict__.pop("_tr_link", None) if tower is not model else None
        if link is not None:
            tower.__class__ = link.original_class
        super().unpatch(model)

    def build_reduced_class(self, cls: type) -> type:
        if self.claimed_class(cls).__name__ in self.towers:  # the tower: a forward with its own signature
            return super().build_reduced_class(cls)
        # the holder: its own methods run unchanged
        return type(f"TokenReduced{cls.__name__}", (_ReducedHolder, cls), {})
