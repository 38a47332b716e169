"""diffusers denoisers: the U-Net of Stable Diffusion 1.x/2.x/XL (`UNet2DConditionModel`), DiT
(`DiTTransformer2DModel`), PixArt (`PixArtTransformer2DModel`), and the joint-attention transformers
of SD3/SD3.5 (`SD3Transformer2DModel`) and Flux (`FluxTransformer2DModel`), given as the model or
as a pipeline that holds it. See docs/diffusion.md.

Every `BasicTransformerBlock` runs its own forward: the placement is made of forward hooks on the
model (the input's grid, the denoising step), on each U-Net `Transformer2DModel` (its level's grid),
on each block (the reducer's plan, made once from the block's input) and on the block's
sub-modules `attn1`, `attn2` and `ff` (merge their input, unmerge their output; or give
self-attention coarser keys and values). So diffusers' attention processors, norms, GLIGEN,
adaptive norms and LoRA layers keep working, and the block's output keeps every token.

SD3 and Flux blocks hold image and text tokens; only image tokens merge. Their joint attention is
hooked the same way (its image stream merged, its output's image part unmerged). Two pieces need
more than a merged input, both still through diffusers' own processor and modules:
- ToDo's coarser image keys and values: pre-hooks on the attention's `to_k` and `to_v` (the
  processor computes queries, keys and values from one `hidden_states`, and the text stream
  already occupies `encoder_hidden_states`);
- Flux's rotary rows: after merging they differ per sample (a slot takes its representative's
  row), and ToDo's keys need other rows than the queries, while the processor applies one
  [tokens, dim] table to queries and keys alike. So the processor gets no table, and forward hooks
  on its q/k norms apply diffusers' `apply_rotary_emb` with the rows of the tokens they hold (the
  processor applies the table right after those norms, so the result is the same computation).

diffusers is never imported here for a model that does not come from it: a model is recognised
only when `diffusers` is already loaded (the user created the model with it).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import Adapter, register_adapter
from tokenreduce.core.contract import ATTN, Patch, Signals
from tokenreduce.core.grid import (
    ATTN_SUBLAYER,
    CROSS_SUBLAYER,
    MLP_SUBLAYER,
    BlockPlan,
    GridBlock,
    GridModelInfo,
    check_levels,
    slot_representatives,
)
from tokenreduce.core.macs import linear_macs
from tokenreduce.core.merge import Assignment, combine, unmerge
from tokenreduce.core.schedule import no_cap
from tokenreduce.core.state import LayerRecord, ReductionState
from tokenreduce.errors import ConfigError, UnsupportedModelError

INSTALL_HINT = "pip install 'tokenreduce[diffusion]'"
MAX_DOWNSAMPLE = (1, 2, 4, 8, 16, 32, 64)
# the denoisers a pipeline may hold, by attribute
DENOISER_ATTRIBUTES = ("unet", "transformer")
# each family: (diffusers module, class, forward argument holding the latent, layout)
FAMILIES = {
    "unet": ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel", "sample", "U-Net"),
    "dit": ("diffusers.models.transformers.dit_transformer_2d", "DiTTransformer2DModel", "hidden_states",
            "single-resolution transformer"),
    "pixart": ("diffusers.models.transformers.pixart_transformer_2d", "PixArtTransformer2DModel", "hidden_states",
               "single-resolution transformer"),
    "sd3": ("diffusers.models.transformers.transformer_sd3", "SD3Transformer2DModel", "hidden_states",
            "single-resolution joint-attention transformer"),
    "flux": ("diffusers.models.transformers.transformer_flux", "FluxTransformer2DModel", "hidden_states",
             "single-resolution joint-attention transformer"),
}
# families whose blocks hold text tokens beside the image tokens (joint attention)
JOINT_FAMILIES = ("sd3", "flux")
# each block kind's sub-layers: (attribute, what a plan calls it); "basic" is BasicTransformerBlock,
# "joint" SD3's JointTransformerBlock (attn2: SD3.5's second self-attention on image tokens),
# "double" and "single" Flux's FluxTransformerBlock and FluxSingleTransformerBlock (proj_mlp: its MLP)
SUBLAYERS_OF = {
    "basic": (("attn1", ATTN_SUBLAYER), ("attn2", CROSS_SUBLAYER), ("ff", MLP_SUBLAYER)),
    "joint": (("attn", ATTN_SUBLAYER), ("attn2", ATTN_SUBLAYER), ("ff", MLP_SUBLAYER)),
    "double": (("attn", ATTN_SUBLAYER), ("ff", MLP_SUBLAYER)),
    "single": (("attn", ATTN_SUBLAYER), ("proj_mlp", MLP_SUBLAYER)),
}


def from_diffusers(obj) -> bool:
    """Whether `obj`'s class comes from diffusers (without importing it: only when it is loaded)."""
    return "diffusers" in sys.modules and any(c.__module__.split(".")[0] == "diffusers" for c in type(obj).__mro__)


def is_pipeline(obj) -> bool:
    return from_diffusers(obj) and any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__)


def denoiser_of(pipeline) -> nn.Module | None:
    """The U-Net or transformer a diffusers pipeline denoises with."""
    for name in DENOISER_ATTRIBUTES:
        module = getattr(pipeline, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def family_of(model: nn.Module) -> str | None:
    if not from_diffusers(model):
        return None
    for family, (module, name, _, _) in FAMILIES.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(model, cls):
            return family
    return None


def diffusers_class(module: str, name: str) -> type:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ConfigError(f"diffusers models need the diffusers package ({module} could not be imported: {err}); "
                          f"install it with {INSTALL_HINT}") from err


# --- the model's blocks --------------------------------------------------------------------------
@dataclass
class BlockEntry:
    """One transformer block: where it sits, its downsampling of the latent grid, and the group
    (a U-Net `Transformer2DModel`, whose input gives the grid) it runs in; -1: the model's own grid."""

    index: int
    name: str
    block: nn.Module
    downsample: int
    group: int = -1
    kind: str = "basic"  # a key of SUBLAYERS_OF

    def sublayers(self) -> list[tuple[str, str, nn.Module]]:
        """(attribute, plan's name, module) of the block's sub-layers that exist."""
        return [(a, s, getattr(self.block, a)) for a, s in SUBLAYERS_OF[self.kind] if getattr(self.block, a, None) is not None]


def unet_groups(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, attention module, downsampling) of every attention module of a U-Net's levels, in
    the order they run: down blocks, the middle block, up blocks."""
    groups, down = [], 1
    for i, block in enumerate(model.down_blocks):
        groups += [(f"down_blocks.{i}.attentions.{j}", a, down) for j, a in enumerate(getattr(block, "attentions", None) or [])]
        if getattr(block, "downsamplers", None):
            down *= 2
    mid = model.mid_block
    if mid is not None:
        groups += [(f"mid_block.attentions.{j}", a, down) for j, a in enumerate(getattr(mid, "attentions", None) or [])]
    for i, block in enumerate(model.up_blocks):
        groups += [(f"up_blocks.{i}.attentions.{j}", a, down) for j, a in enumerate(getattr(block, "attentions", None) or [])]
        if getattr(block, "upsamplers", None):
            down = max(1, down // 2)
    return groups


def walk(model: nn.Module, family: str) -> tuple[list[BlockEntry], list[tuple[int, nn.Module]]]:
    """The model's transformer blocks in the order they run, and the U-Net groups (index, module)."""
    who = type(model).__name__
    t2d = diffusers_class("diffusers.models.transformers.transformer_2d", "Transformer2DModel")
    entries, groups = [], []
    if family == "unet":
        for g, (name, group, down) in enumerate(unet_groups(model)):
            if type(group) is not t2d or not group.is_input_continuous:
                raise UnsupportedModelError(
                    f"model {who} has {type(group).__name__} at {name}; supported: Transformer2DModel on a continuous "
                    "(image-shaped) input")
            groups.append((g, group))
            entries += [BlockEntry(len(entries) + k, f"{name}.transformer_blocks.{k}", b, down, g)
                        for k, b in enumerate(group.transformer_blocks)]
    elif family == "sd3":
        entries = [BlockEntry(k, f"transformer_blocks.{k}", b, 1, kind="joint") for k, b in enumerate(model.transformer_blocks)]
    elif family == "flux":
        entries = [BlockEntry(k, f"transformer_blocks.{k}", b, 1, kind="double") for k, b in enumerate(model.transformer_blocks)]
        entries += [BlockEntry(len(entries) + k, f"single_transformer_blocks.{k}", b, 1, kind="single")
                    for k, b in enumerate(model.single_transformer_blocks)]
    else:
        entries = [BlockEntry(k, f"transformer_blocks.{k}", b, 1) for k, b in enumerate(model.transformer_blocks)]
    return entries, groups


# each block kind: (diffusers module, block class, attention module, attention class)
BLOCK_CLASSES = {
    "basic": ("diffusers.models.attention", "BasicTransformerBlock", "diffusers.models.attention_processor", "Attention"),
    "joint": ("diffusers.models.attention", "JointTransformerBlock", "diffusers.models.attention_processor", "Attention"),
    "double": ("diffusers.models.transformers.transformer_flux", "FluxTransformerBlock",
               "diffusers.models.transformers.transformer_flux", "FluxAttention"),
    "single": ("diffusers.models.transformers.transformer_flux", "FluxSingleTransformerBlock",
               "diffusers.models.transformers.transformer_flux", "FluxAttention"),
}


def attention_of(entry: BlockEntry) -> nn.Module:
    """The block's (first) self-attention."""
    return entry.block.attn1 if entry.kind == "basic" else entry.block.attn


def check_blocks(model: nn.Module, entries: list[BlockEntry]) -> None:
    """Every block is of its kind's class with diffusers' attention module (BasicTransformerBlock,
    JointTransformerBlock with Attention; Flux's blocks with FluxAttention), and every
    BasicTransformerBlock of the model is one of `entries` (a block elsewhere would run unplanned)."""
    who = type(model).__name__
    basic = diffusers_class("diffusers.models.attention", "BasicTransformerBlock")
    if not entries:
        raise UnsupportedModelError(f"model {who} has no transformer block to reduce; supported: models with "
                                    "BasicTransformerBlocks, JointTransformerBlocks or Flux transformer blocks")
    for e in entries:
        block_module, block_name, attn_module, attn_name = BLOCK_CLASSES[e.kind]
        block_cls, attn_cls = diffusers_class(block_module, block_name), diffusers_class(attn_module, attn_name)
        attn = getattr(e.block, "attn1" if e.kind == "basic" else "attn", None)
        if not isinstance(e.block, block_cls) or not isinstance(attn, attn_cls):
            raise UnsupportedModelError(
                f"model {who} block {e.name} is {type(e.block).__name__} with {type(attn).__name__}; "
                f"supported: {block_name} with diffusers' {attn_name}")
    known = {id(e.block) for e in entries}
    for name, module in model.named_modules():
        if isinstance(module, basic) and id(module) not in known:
            raise UnsupportedModelError(f"model {who} has a BasicTransformerBlock at {name}, outside the levels this "
                                        "adapter follows; supported: blocks inside the U-Net's Transformer2DModels")


def describe_model(model: nn.Module) -> GridModelInfo:
    family = family_of(model)
    entries, _ = walk(model, family)
    check_blocks(model, entries)
    attn = attention_of(entries[0])
    return GridModelInfo(name=type(model).__name__, depth=len(entries), num_prefix=0, has_class_token=False,
                         embed_dim=attn.query_dim, num_heads=attn.heads,
                         block_downsample=tuple(e.downsample for e in entries), layout=FAMILIES[family][3])


# --- what one pass records -----------------------------------------------------------------------
@dataclass
class BlockRun:
    """Tokens through one block's sub-layers in one pass (per sample): image tokens, except
    `context` (the text tokens of a joint-attention block, which join its attention's queries and
    keys and never merge)."""

    tokens: int
    attn_q: int = 0
    attn_kv: int = 0
    cross_q: int = 0
    cross_kv: int = 0
    dual_q: int = 0  # SD3.5's second self-attention (attn2)
    dual_kv: int = 0
    mlp: int = 0
    context: int = 0
    reducer_macs: int = 0
    assignment: Assignment | None = None  # the block's merge plan (None: nothing merged), for merge maps
    grid: tuple[int, int] = (0, 0)  # the block's token grid (rows, columns)

    def count(self, kind: str, name: str, queries: int, keys: int) -> None:
        if name in ("attn1", "attn"):
            self.attn_q, self.attn_kv = queries, keys
        elif name == "attn2" and kind == "basic":
            self.cross_q, self.cross_kv = queries, keys
        elif name == "attn2":
            self.dual_q, self.dual_kv = queries, keys
        else:
            self.mlp = queries


@dataclass
class PassContext:
    """One forward pass: the grid of each U-Net group, each block's plan while it runs, the records."""

    height: int
    width: int
    step: int | None
    timestep: float | None
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    plans: dict[int, BlockPlan] = field(default_factory=dict)
    pending: dict[tuple[int, str], tuple] = field(default_factory=dict)
    runs: dict[int, BlockRun] = field(default_factory=dict)
    ids: Tensor | None = None  # Flux: the image tokens' position ids [N, 3]
    kv: dict[tuple[int, str], tuple] = field(default_factory=dict)  # (kv_tokens, text tokens) per attention
    rope: dict[int, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)  # rows per q/k norm


@dataclass
class StepCounter:
    """The denoising step: it advances when the timestep falls and restarts when it rises (a new
    sampling run); calls with the same timestep (guidance run apart) share a step."""

    last: float | None = None
    step: int = 0

    def advance(self, t: float) -> int:
        if self.last is None or t > self.last:
            self.step = 0
        elif t < self.last:
            self.step += 1
        self.last = t
        return self.step


@dataclass
class DiffusersPatch(Patch):
    """The Patch of a diffusers model: its blocks, the hooks placed on it, the pass in flight (per
    thread) and the step counter."""

    family: str = ""
    entries: list[BlockEntry] = field(default_factory=list, repr=False)
    handles: list = field(default_factory=list, repr=False)
    local: threading.local = field(default_factory=threading.local, repr=False)
    steps: StepCounter = field(default_factory=StepCounter)

    def __reduce_ex__(self, protocol):
        # a copy would carry hooks that point at the original model (and remove those)
        raise ConfigError("a token-reduced diffusers model cannot be copied or pickled; allowed: copy or save it "
                          "before tokenreduce.apply, or after tokenreduce.remove (the state dict is unchanged)")


class CapturedPlan(ReductionState):
    """The state a token-merging reducer's `reduce` runs against when it plans a grid block: its
    merge is recorded, not applied."""

    def merge(self, x: Tensor, assignment, mode: str = "wavg", **kwargs) -> Tensor:
        self.extras["plan"] = (assignment, mode, kwargs)
        return x


# --- reducers ------------------------------------------------------------------------------------
def plans_itself(reducer) -> bool:
    return callable(getattr(reducer, "plan_block", None))


def refusal(reducer) -> str | None:
    """Why a reducer cannot merge-compute-unmerge in a diffusers block, None if it can."""
    owner = next(c for c in type(reducer).__mro__ if "block_forward" in vars(c))
    if owner.__module__ != "tokenreduce.reducers.base":
        return "it runs its own steps inside a block (block_forward), and a diffusers block runs only its own forward"
    if ATTN in reducer.needs:
        return "it needs attention probabilities, which diffusers' attention processors do not return"
    if reducer.refill:
        return "it adds a fused token, which has no place on the latent grid"
    if reducer.cap is no_cap:
        return "it prunes tokens, and every token of a diffusion block needs an output"
    if reducer.has_training_losses():
        return "it adds losses of the whole pass, which a denoiser's training does not compute"
    return None


def plan_by_reduce(reducer, x: Tensor, block: GridBlock, options: dict) -> BlockPlan | None:
    """The plan of a token-merging reducer (ToMe, PiToMe, ToFu, ATC): its `reduce` on the block's
    input tokens (their metric too, as tomesd's), the merge it asks for kept as the plan."""
    if block.downsample > options["max_downsample"]:
        return None
    removal = reducer.removal_at(block.index, block.num_blocks, x.shape[1])
    if not reducer.acts_at(block.index, removal):
        return None
    state = CapturedPlan(num_prefix=0, removals=[0] * block.num_blocks, prop_attn=reducer.prop_attn)
    state.begin_layer(x.shape[1])
    reducer.reduce(x, Signals(keys=x), state, block.index, removal)
    assignment, mode, kwargs = state.extras.get("plan", (None, None, None))
    if assignment is None:
        return None
    sublayers = frozenset(s for s, key in ((ATTN_SUBLAYER, "merge_attn"), (CROSS_SUBLAYER, "merge_crossattn"),
                                           (MLP_SUBLAYER, "merge_mlp")) if options[key])
    return BlockPlan(assignment=assignment, mode=mode, combine_kwargs=kwargs, sublayers=sublayers,
                     reducer_macs=state.records[-1].reducer_macs)


# --- the hooks -----------------------------------------------------------------------------------
def argument(args: tuple, kwargs: dict, position: int, name: str):
    return args[position] if len(args) > position else kwargs.get(name)


def with_argument(args: tuple, kwargs: dict, position: int, name: str, value) -> tuple[tuple, dict]:
    if len(args) > position:
        return (*args[:position], value, *args[position + 1:]), kwargs
    return args, {**kwargs, name: value}


def unmerge_image(y: Tensor, assignment, text: int) -> Tensor:
    """`unmerge` of the image tokens that follow `text` leading text tokens."""
    if not text:
        return unmerge(y, assignment)
    return torch.cat([y[:, :text], unmerge(y[:, text:], assignment)], dim=1)


# a Flux attention's norms, in the order its processor runs them: image queries and keys (all
# tokens in a single-stream block), then the text stream's
ROPE_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def rope_rows(kind: str, text: tuple, queries: tuple, keys: tuple) -> dict[str, tuple[Tensor, Tensor]]:
    """The (cos, sin) rows each of a Flux attention's q/k norms applies: a double-stream block norms
    the image and text streams apart; a single-stream block's norms hold the text tokens, then the
    image tokens. Image rows are [n, D], or [B, n, D] when they differ per sample."""
    if kind == "double":
        return {"norm_q": queries, "norm_k": keys, "norm_added_q": text, "norm_added_k": text}
    return {"norm_q": join_rows(text, queries), "norm_k": join_rows(text, keys)}


def join_rows(text: tuple, image: tuple) -> tuple[Tensor, Tensor]:
    out = []
    for t, i in zip(text, image, strict=True):
        if i.dim() == 3:
            t = t.expand(i.shape[0], -1, -1)
        out.append(torch.cat([t, i], dim=-2))
    return out[0], out[1]


def rotate(apply_rope, x: Tensor, rows: tuple[Tensor, Tensor]) -> Tensor:
    """diffusers' `apply_rotary_emb` on x [B, S, H, D] with rows [S, D], or [B, S, D] one sample at a
    time (its table broadcasts over the batch)."""
    cos, sin = rows
    if cos.dim() == 2:
        return apply_rope(x, (cos, sin), sequence_dim=1)
    return torch.cat([apply_rope(x[i:i + 1], (cos[i], sin[i]), sequence_dim=1) for i in range(x.shape[0])])


def flux_grid(who: str, ids, tokens: int) -> tuple[int, int, Tensor]:
    """The grid Flux's image position ids lay the tokens on: (height, width, ids [N, 3]), where
    token i sits at row ids[i, 1] = i // width and column ids[i, 2] = i % width."""
    if not isinstance(ids, Tensor) or ids.dim() not in (2, 3) or ids.shape[-1] < 3:
        raise ConfigError(f"img_ids={ids!r:.60} is invalid for a token-reduced {who}; allowed: the image tokens' "
                          "position ids, a tensor [tokens, 3]")
    if ids.dim() == 3:  # the deprecated batched form, as the model reads it
        ids = ids[0]
    token = torch.arange(tokens, device=ids.device)
    width = int(ids[:, 2].max()) + 1 if ids.shape[0] else 0
    if (ids.shape[0] != tokens or width < 1 or tokens % width
            or not torch.equal(ids[:, 1], (token // width).to(ids.dtype))
            or not torch.equal(ids[:, 2], (token % width).to(ids.dtype))):
        raise UnsupportedModelError(
            f"{who}: img_ids do not lay its {tokens} image tokens on one row-major grid from (0, 0) (more than one "
            "image, such as Kontext's reference tokens?); supported: one image's ids, token i at row i // width and "
            "column i % width")
    return tokens // width, width, ids


def one_timestep(timestep) -> float:
    if isinstance(timestep, Tensor):
        flat = timestep.flatten()
        if flat.numel() == 0:
            raise ConfigError("timestep: an empty tensor; allowed: one timestep per pass")
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ConfigError(f"timestep={flat.tolist()} differs within the batch; a ratio per denoising step needs "
                              "one timestep per pass; allowed: one timestep for the whole batch, or a fixed ratio")
        return float(flat[0])
    return float(timestep)


class Hooks:
    """The hooks of one patched model, around the objects they share."""

    def __init__(self, model: nn.Module, patch: DiffusersPatch, reducer, options: dict):
        self.model, self.patch, self.reducer, self.options = model, patch, reducer, options
        self.latent_arg = FAMILIES[patch.family][2]
        self.signature = inspect.signature(type(model).forward)
        self.patch_size = model.config.patch_size if patch.family != "unet" else 1
        self.merges_attn = plans_itself(reducer) or options["merge_attn"]
        self.kv_modules: dict[tuple[int, str], tuple[nn.Module, nn.Module]] = {}
        if patch.family == "flux":
            self.apply_rope = diffusers_class("diffusers.models.embeddings", "apply_rotary_emb")
            self.flux_processor = diffusers_class("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor")

    @property
    def ctx(self) -> PassContext | None:
        return getattr(self.patch.local, "ctx", None)

    # the model --------------------------------------------------------------------------------
    def model_pre(self, module, args, kwargs):
        if module is not self.model:  # a deep copy keeps the hooks, which still point at the original
            raise ConfigError(
                f"this {type(module).__name__} is a copy of a token-reduced model and runs the original's hooks; allowed: "
                "copy the model before tokenreduce.apply, or call tokenreduce.remove on the original first")
        bound = self.signature.bind(module, *args, **kwargs).arguments
        latent = bound.get(self.latent_arg)
        if bound.get("attention_mask") is not None and self.merges_attn:
            raise ConfigError(
                f"attention_mask is not supported on a token-reduced {type(module).__name__}: it masks self-attention's "
                "keys, which merge or are downsampled; allowed: attention_mask=None (encoder_attention_mask is fine)")
        if torch.is_grad_enabled() and getattr(module, "is_gradient_checkpointing", False):
            raise ConfigError(
                f"gradient checkpointing is on in a token-reduced {type(module).__name__}: the backward pass recomputes "
                "each block outside the pass that planned its merge; allowed: model.disable_gradient_checkpointing(), "
                "or no gradient (torch.no_grad())")
        step = timestep = None
        if getattr(self.reducer, "needs_timestep", False):
            timestep = one_timestep(bound.get("timestep"))
            step = self.patch.steps.advance(timestep)
        ids = None
        if self.patch.family == "flux":  # its latent comes as tokens: the ids hold the grid
            height, width, ids = flux_grid(type(module).__name__, bound.get("img_ids"), latent.shape[1])
        else:
            height, width = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        self.patch.local.ctx = PassContext(height, width, step, timestep, ids=ids)

    def model_post(self, module, args, output):
        ctx, self.patch.local.ctx = self.ctx, None
        if ctx is not None:
            self.patch.last_state = pass_state(self.patch.entries, ctx)

    # a U-Net level's Transformer2DModel ---------------------------------------------------------
    def group_pre(self, group: int):
        def hook(module, args, kwargs):
            ctx = self.ctx
            if ctx is not None:
                x = argument(args, kwargs, 0, "hidden_states")
                ctx.grids[group] = (x.shape[-2], x.shape[-1])
        return hook

    # a block ----------------------------------------------------------------------------------
    def block_pre(self, entry: BlockEntry):
        def hook(module, args, kwargs):
            ctx = self.ctx
            if ctx is None:
                return
            x = argument(args, kwargs, 0, "hidden_states")
            height, width = ctx.grids.get(entry.group, (ctx.height, ctx.width))
            if x.shape[1] != height * width:
                raise UnsupportedModelError(
                    f"block {entry.name} of {type(self.model).__name__} received {x.shape[1]} tokens, not its "
                    f"{height} x {width} latent grid; supported: blocks whose tokens are their level's grid, row-major")
            run = ctx.runs[entry.index] = BlockRun(tokens=x.shape[1], grid=(height, width))
            if entry.kind != "basic":
                run.context = argument(args, kwargs, 1, "encoder_hidden_states").shape[1]
            if x.shape[0] == 0:
                return
            block = GridBlock(entry.index, len(self.patch.entries), height, width, entry.downsample, ctx.step,
                              ctx.timestep)
            if plans_itself(self.reducer):
                plan = self.reducer.plan_block(x, block)
            else:
                plan = plan_by_reduce(self.reducer, x, block, self.options)
            if plan is not None:
                ctx.plans[entry.index] = plan
                run.reducer_macs, run.assignment = plan.reducer_macs, plan.assignment
        return hook

    def block_post(self, entry: BlockEntry):
        def hook(module, args, output):
            ctx = self.ctx
            if ctx is not None:
                ctx.plans.pop(entry.index, None)
                ctx.rope.pop(entry.index, None)
        return hook

    # a sub-layer ------------------------------------------------------------------------------
    def sublayer_pre(self, entry: BlockEntry, name: str, sublayer: str):
        def hook(module, args, kwargs):
            ctx = self.ctx
            if ctx is None or entry.index not in ctx.runs:
                return None
            run, plan = ctx.runs[entry.index], ctx.plans.get(entry.index)
            h = argument(args, kwargs, 0, "hidden_states")
            # a single-stream block's attention and MLP take the text tokens, then the image tokens
            text = run.context if entry.kind == "single" else 0
            # in a BasicTransformerBlock, encoder_hidden_states makes an attention cross-attention
            context = kwargs.get("encoder_hidden_states") if entry.kind == "basic" and sublayer != MLP_SUBLAYER else None
            merge = plan is not None and plan.assignment is not None and sublayer in plan.sublayers
            downsample = (not merge and sublayer == ATTN_SUBLAYER and plan is not None and plan.kv_tokens is not None
                          and context is None and h.dim() == 3)
            if (merge or downsample) and name == "attn" and self.patch.family == "flux" \
                    and not isinstance(module.processor, self.flux_processor):
                raise ConfigError(
                    f"block {entry.name}: its attention processor {type(module.processor).__name__} is not "
                    "FluxAttnProcessor, whose rotary embedding this adapter moves to the kept tokens; allowed: "
                    "FluxAttnProcessor (any attention backend), or tokenreduce.remove")
            rows = None
            if merge:
                assignment = plan.assignment
                image = h[:, text:]
                if image.shape[:2] != tuple(assignment.dest.shape):
                    raise ConfigError(
                        f"block {entry.name}: its {sublayer} received tokens of shape {tuple(image.shape[:2])}, not the "
                        f"block's {tuple(assignment.dest.shape)} (feed-forward chunking?); allowed: "
                        "block.set_chunk_feed_forward(None) with merging around the MLP")
                merged, sizes = combine(image, None, assignment, plan.mode, **plan.combine_kwargs)
                h = torch.cat([h[:, :text], merged], dim=1) if text else merged
                args, kwargs = with_argument(args, kwargs, 0, "hidden_states", h)
                ctx.pending[(entry.index, name)] = (assignment, text)
                if entry.kind == "basic" and sublayer == ATTN_SUBLAYER and context is None and self.reducer.prop_attn:
                    if kwargs.get("attention_mask") is not None:
                        raise ConfigError(f"block {entry.name}: proportional attention needs attention_mask=None on "
                                          "self-attention; allowed: prop_attn=False")
                    kwargs = {**kwargs, "attention_mask": sizes.log().to(h.dtype).transpose(1, 2)}
                if self.patch.family == "flux" and name == "attn":
                    rows = self.merged_rows(entry, run, kwargs, slot_representatives(assignment))
            elif downsample:
                if getattr(module, "fused_projections", False):
                    raise ConfigError(f"block {entry.name}: fused q/k/v projections compute keys from the queries' "
                                      "tokens; allowed: model.unfuse_qkv_projections() with a reducer that downsamples "
                                      "keys and values")
                if entry.kind == "basic":
                    context = plan.kv_tokens(h)
                    kwargs = {**kwargs, "encoder_hidden_states": context}
                else:
                    self.check_kv_modules(entry, name, module)
                    ctx.kv[(entry.index, name)] = [plan.kv_tokens, text, None, None]
                    if self.patch.family == "flux":
                        rows = self.kv_rows(entry, run, kwargs, plan.kv_tokens, ctx.ids)
            if rows is not None:
                ctx.rope[entry.index] = rows
                kwargs = {**kwargs, "image_rotary_emb": None}
            tokens = h.shape[1] - text
            run.count(entry.kind, name, tokens, tokens if context is None else context.shape[1])
            return args, kwargs
        return hook

    def sublayer_post(self, entry: BlockEntry, name: str):
        def hook(module, args, output):
            ctx = self.ctx
            if ctx is None:
                return None
            ctx.kv.pop((entry.index, name), None)
            if name == "attn":
                ctx.rope.pop(entry.index, None)
            pending = ctx.pending.pop((entry.index, name), None)
            if pending is None or output is None:  # output None: the sub-layer failed
                return None
            if isinstance(output, tuple):  # joint attention: (image, text); only the image part merged
                return (unmerge_image(output[0], *pending), *output[1:])
            return unmerge_image(output, *pending)
        return hook

    # joint attention's pieces ----------------------------------------------------------------------
    def check_kv_modules(self, entry: BlockEntry, name: str, module: nn.Module) -> None:
        to_k, to_v = self.kv_modules[(entry.index, name)]
        if module.to_k is not to_k or module.to_v is not to_v:
            raise ConfigError(
                f"block {entry.name}: {name}.to_k or {name}.to_v was replaced after tokenreduce.apply (a LoRA loaded?), "
                "so the key/value downsampling does not reach it; allowed: load adapters before tokenreduce.apply, "
                "or apply again")

    def kv_pre(self, entry: BlockEntry, name: str):
        """to_k and to_v of a joint-attention block's attention: ToDo's image keys and values."""
        def hook(module, args):
            ctx = self.ctx
            job = None if ctx is None else ctx.kv.get((entry.index, name))
            if job is None:
                return None
            kv_tokens, text, seen, small = job
            x = args[0]
            if x is not seen:  # to_k and to_v receive one tensor: resample it once
                small = kv_tokens(x[:, text:])
                job[2:] = [x, small]
                run = ctx.runs[entry.index]
                run.count(entry.kind, name, run.dual_q if name == "attn2" else run.attn_q, small.shape[1])
            return (torch.cat([x[:, :text], small], dim=1) if text else small, *args[1:])
        return hook

    def merged_rows(self, entry: BlockEntry, run: BlockRun, kwargs: dict, reps: Tensor):
        """Rotary rows when Flux's image tokens merge: each slot takes its representative's row."""
        table = kwargs.get("image_rotary_emb")
        if table is None:
            return None
        t = run.context
        cos, sin = table
        image = cos[t:][reps], sin[t:][reps]
        return rope_rows(entry.kind, (cos[:t], sin[:t]), image, image)

    def kv_rows(self, entry: BlockEntry, run: BlockRun, kwargs: dict, kv_tokens, ids: Tensor):
        """Rotary rows when ToDo resamples Flux's image keys: the queries keep theirs, the keys take
        the rows of their positions (the position ids resampled as the tokens are)."""
        table = kwargs.get("image_rotary_emb")
        if table is None:
            return None
        t = run.context
        cos, sin = table
        keys = self.model.pos_embed(kv_tokens(ids[None].float())[0])
        return rope_rows(entry.kind, (cos[:t], sin[:t]), (cos[t:], sin[t:]), tuple(m.to(cos.dtype) for m in keys))

    def rope_post(self, entry: BlockEntry, norm: str):
        """A Flux attention's q/k norm: its output takes the rotary rows of the tokens it holds."""
        def hook(module, args, output):
            ctx = self.ctx
            rows = None if ctx is None else ctx.rope.get(entry.index, {}).get(norm)
            if rows is None:
                return None
            return rotate(self.apply_rope, output, rows)
        return hook

    def install(self) -> list:
        model, patch = self.model, self.patch
        handles = [model.register_forward_pre_hook(self.model_pre, with_kwargs=True),
                   model.register_forward_hook(self.model_post, always_call=True)]
        if patch.family == "unet":
            for g, group in walk(model, "unet")[1]:
                handles.append(group.register_forward_pre_hook(self.group_pre(g), with_kwargs=True))
        for entry in patch.entries:
            block = entry.block
            handles += [block.register_forward_pre_hook(self.block_pre(entry), with_kwargs=True),
                        block.register_forward_hook(self.block_post(entry), always_call=True)]
            for name, sublayer, module in entry.sublayers():
                handles += [module.register_forward_pre_hook(self.sublayer_pre(entry, name, sublayer), with_kwargs=True),
                            module.register_forward_hook(self.sublayer_post(entry, name), always_call=True)]
                if entry.kind != "basic" and sublayer == ATTN_SUBLAYER:
                    self.kv_modules[(entry.index, name)] = (module.to_k, module.to_v)
                    handles += [module.to_k.register_forward_pre_hook(self.kv_pre(entry, name)),
                                module.to_v.register_forward_pre_hook(self.kv_pre(entry, name))]
                if patch.family == "flux" and name == "attn":
                    handles += [getattr(module, norm).register_forward_hook(self.rope_post(entry, norm))
                                for norm in ROPE_NORMS if getattr(module, norm, None) is not None]
        return handles


# --- MACs and stats ------------------------------------------------------------------------------
def pass_state(entries: list[BlockEntry], ctx: PassContext) -> ReductionState:
    """The pass as a ReductionState: per block the tokens through self-attention and the MLP, the
    reducer's MACs, and the full record of each block under extras["runs"]."""
    state = ReductionState(num_prefix=0, removals=[])
    runs = [ctx.runs.get(e.index) for e in entries]
    for run in runs:
        if run is not None:
            state.records.append(LayerRecord(tokens_attn=run.attn_q, tokens_mlp=run.mlp, tokens_in=run.tokens,
                                             reducer_macs=run.reducer_macs))
    state.final_tokens = next((r.tokens for r in reversed(runs) if r is not None), 0)
    state.extras["runs"] = runs
    state.extras["step"], state.extras["timestep"] = ctx.step, ctx.timestep
    return state


def attention_macs(attn: nn.Module, queries: int, keys: int, text: int = 0, one_stream: bool = False) -> int:
    """Projections of `queries` and `keys` tokens, q.k^T and attention.v; with `text` tokens that join
    both (joint attention), projected by the text stream's own layers (add_*_proj, to_add_out), or
    by the same ones (`one_stream`: a single-stream block)."""
    q, k, v = attn.to_q, attn.to_k, attn.to_v
    out = linear_macs(getattr(attn, "to_out", None) or nn.Module())  # a single-stream block has none
    macs = (queries * (linear_macs(q) + out) + keys * (linear_macs(k) + linear_macs(v))
            + (queries + text) * (keys + text) * (q.out_features + v.out_features))
    if one_stream:
        return macs + text * (linear_macs(q) + linear_macs(k) + linear_macs(v))
    if text:
        macs += text * sum(linear_macs(m) for m in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out)
                           if m is not None)
    return macs


def block_macs(entry: BlockEntry, run: BlockRun) -> int:
    """MACs of one block for one sample as it ran: attention, cross-attention, MLP, and the linear
    layers applied once per sample (adaptive norms' modulation and timestep embedding)."""
    block = entry.block
    t = run.context
    if entry.kind == "basic":
        per_token = [(block.attn1, attention_macs(block.attn1, run.attn_q, run.attn_kv)),
                     (block.ff, run.mlp * linear_macs(block.ff))]
        if block.attn2 is not None:
            per_token.append((block.attn2, attention_macs(block.attn2, run.cross_q, run.cross_kv)))
    elif entry.kind == "single":
        per_token = [(block.attn, attention_macs(block.attn, run.attn_q, run.attn_kv, t, one_stream=True)),
                     (block.proj_mlp, (t + run.mlp) * linear_macs(block.proj_mlp)),
                     (block.proj_out, (t + run.tokens) * linear_macs(block.proj_out))]
    else:
        per_token = [(block.attn, attention_macs(block.attn, run.attn_q, run.attn_kv, t)),
                     (block.ff, run.mlp * linear_macs(block.ff))]
        if getattr(block, "attn2", None) is not None:
            per_token.append((block.attn2, attention_macs(block.attn2, run.dual_q, run.dual_kv)))
        if block.ff_context is not None:
            per_token.append((block.ff_context, t * linear_macs(block.ff_context)))
    per_sample = linear_macs(block) - sum(linear_macs(m) for m, _ in per_token)
    return sum(macs for _, macs in per_token) + per_sample


# --- the adapter ---------------------------------------------------------------------------------
@register_adapter("diffusers")
class DiffusersAdapter(Adapter):
    family = ("diffusers UNet2DConditionModel (SD 1.x/2.x/XL), DiTTransformer2DModel, PixArtTransformer2DModel, "
              "SD3Transformer2DModel (SD3/SD3.5), FluxTransformer2DModel, or a pipeline holding one")
    options = {
        # where a token-merging reducer (tome, pitome, tofu, atc) merges; tomesd and todo take their own
        "max_downsample": MAX_DOWNSAMPLE,
        "merge_attn": (True, False),
        "merge_crossattn": (False, True),
        "merge_mlp": (False, True),
    }

    def claims(self, model) -> bool:
        return family_of(model) is not None

    def inner_model(self, obj) -> nn.Module | None:
        if is_pipeline(obj):
            return denoiser_of(obj)
        return None

    def describe(self, model: nn.Module) -> GridModelInfo:
        return describe_model(model)

    def check_reducer(self, model: nn.Module, reducer, info: GridModelInfo, options: dict) -> None:
        joint = family_of(model) in JOINT_FAMILIES
        nothing = (f"merges nothing in {info.name}: its blocks have no cross-attention (the text tokens join the "
                   "image tokens' attention)")
        if plans_itself(reducer):
            changed = {k: v for k, v in options.items() if v != self.options[k][0]}
            if changed:
                raise ConfigError(
                    f"adapter_options {changed} are for token-merging reducers such as 'tome'; {reducer.name!r} takes "
                    "max_downsample (and its own merge settings) as parameters; allowed: no adapter_options")
            sublayers = getattr(reducer, "sublayers", None)
            if joint and sublayers is not None and not sublayers & {ATTN_SUBLAYER, MLP_SUBLAYER}:
                raise ConfigError(f"{reducer.name}: merge_crossattn alone {nothing}; allowed: merge_attn or merge_mlp true")
            return
        why = refusal(reducer)
        if why:
            raise ConfigError(f"reducer {reducer.name!r} cannot run in {info.name}: {why}; allowed: 'tomesd', 'todo', "
                              "or a token-merging reducer ('tome', 'pitome', 'tofu', 'atc')")
        if reducer.schedule.removes_nothing:
            return
        if not (options["merge_attn"] or options["merge_crossattn"] or options["merge_mlp"]):
            raise ConfigError("adapter_options merge_attn, merge_crossattn and merge_mlp are all false, so nothing "
                              "would merge; allowed: at least one of them true")
        if joint and not (options["merge_attn"] or options["merge_mlp"]):
            raise ConfigError(f"adapter_options merge_crossattn alone {nothing}; allowed: merge_attn or merge_mlp true")
        if joint and reducer.prop_attn:
            # SD3's joint attention processor ignores attention_mask, so a size bias would be lost
            raise ConfigError(f"reducer {reducer.name!r} with prop_attn=True cannot run in {info.name}: its joint "
                              "attention takes no per-key bias for merged tokens here; allowed: prop_attn=False")
        check_levels(f"adapter_options (reducer {reducer.name!r})", info, options["max_downsample"])

    def patch(self, model: nn.Module, reducer, info: GridModelInfo, options: dict) -> None:
        family = family_of(model)
        patch = DiffusersPatch(adapter=self, original_class=type(model), info=info, options=options, family=family,
                               entries=walk(model, family)[0])
        model._tokenreduce = patch
        model.token_reducer = reducer
        patch.handles = Hooks(model, patch, reducer, options).install()

    def unpatch(self, model: nn.Module) -> None:
        for handle in model._tokenreduce.handles:
            handle.remove()
        del model.token_reducer
        del model._tokenreduce

    def pass_macs(self, model: nn.Module, state: ReductionState) -> dict[str, int]:
        entries = model._tokenreduce.entries
        runs = state.extras.get("runs", [])
        blocks = sum(block_macs(e, r) for e, r in zip(entries, runs, strict=False) if r is not None)
        reducer = sum(r.reducer_macs for r in runs if r is not None)
        return {"blocks": blocks, "reducer": reducer, "total": blocks + reducer}

    def pass_stats(self, model: nn.Module, state: ReductionState) -> dict:
        entries = model._tokenreduce.entries
        runs = state.extras.get("runs", [])
        blocks = [{"block": e.name, "downsample": e.downsample, "tokens": r.tokens, "attn": r.attn_q,
                   "attn_keys": r.attn_kv, "crossattn": r.cross_q, "dualattn": r.dual_q, "dualattn_keys": r.dual_kv,
                   "context": r.context, "mlp": r.mlp, "macs": block_macs(e, r),
                   "reducer_macs": r.reducer_macs,
                   "grid": r.grid, "slots": None if r.assignment is None else r.assignment.dest}
                  for e, r in zip(entries, runs, strict=False) if r is not None]
        macs = self.pass_macs(model, state)
        return {"tokens": [b["attn"] for b in blocks], "removed": [b["tokens"] - b["attn"] for b in blocks],
                "blocks": blocks, "macs": macs["total"], "macs_parts": macs, "step": state.extras.get("step"),
                "timestep": state.extras.get("timestep"), "source": None}
