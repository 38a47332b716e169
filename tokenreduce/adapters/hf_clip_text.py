"""Placing a reducer into the text towers of Hugging Face `transformers` (>= 5) CLIP and SigLIP:
`CLIPTextModel`, `CLIPTextModelWithProjection` and `SiglipTextModel`. A dual encoder's text tower
(`CLIPModel.text_model`, `SiglipModel.text_model`) is one of these: a reducer applied to it reduces
the text tower on its own, with its own parameters, whether or not the image tower (hf_clip, applied
to the dual encoder) carries one; the dual encoder's `get_text_features`, `get_image_features` and
`forward` call the towers as before.

The tower (`CLIPTextModel` / `SiglipTextModel`: the model itself, or `CLIPTextModelWithProjection`'s
`text_model`) gets a `forward` with its own signature and output class. It runs hf_text's scheme: a
padded batch (`attention_mask`, right padding) runs in groups of sequences with the same number of
tokens in the pass, each without its padding, and the groups' outputs are put back into one
zero-padded batch (`hf_text.reduced_mask` and `hf_text.mean_pool` read it). The loop over the layers
is hf_vit's (the block loop `run_blocks`) with the steps of hf_clip's `TowerLayerOps`; the attention mask
of every layer is built here from the tokens the pass holds (`TextTowerOps`), combined with the
proportional-attention log-size bias.

The pooled token: CLIP pools its EOS token (`eos_token_id`; the legacy value 2: the largest id of the
sequence, as transformers' `CLIPTextModel.forward`), SigLIP its last position. It and the first token
are the two prefix tokens (never merged or pruned): the pooled token is placed first for the pass and
the others follow in order, so the reducers that rank tokens by the class token's attention read the
pooled token's. Where the pooled token lies in the padding (SigLIP with an `attention_mask`, or CLIP
whose EOS is padding), it runs as transformers runs it: a query over the real tokens that no token
sees as a key.

CLIP is causal. Each token has a position, the latest input position among the tokens it stands for
(read from the pass's source map, which the pass always traces), and key j is visible to query i iff
pos[j] <= pos[i]: a merged token takes its latest member's position, so no token reads, through
attention, anything from a later position. The reducers' decisions (which tokens merge or go) are
taken over the whole sequence. Tokens after the EOS are ordinary tokens (`after_eos="keep"`, the
default: the model's outputs at zero reduction, `last_hidden_state` included) or are not run at all
(`after_eos="drop"`: they cannot change the EOS token or any token before it, so the pooled output is
unchanged at zero reduction and the reduction is spent on the tokens before it).
SigLIP is bidirectional; nothing follows its pooled token.

The output tokens are ordered by position (the input order when nothing is removed). At zero
reduction the outputs are the model's up to float rounding (the pass holds the pooled token first,
which changes the order of the sums in attention).

`transformers` is imported only when a model's class comes from it (as in hf_vit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import ModelInfo, register_adapter
from tokenreduce.adapters.blocks import run_blocks
from tokenreduce.adapters.hf_clip import FAMILIES, HFCLIPAdapter, TowerLayerOps, check_tower, owner_of
from tokenreduce.adapters.hf_common import (
    PASSED,
    REFUSED_OUTPUTS,
    LayerLoop,
    bind,
    block_costs,
    check_attention_implementation,
    family_class,
    from_transformers,
    import_transformers,
    refuse_outputs,
    spec_of,
)
from tokenreduce.adapters.hf_text import check_text_reducer, real_counts
from tokenreduce.core.macs import linear_macs, macs_parts
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnsupportedModelError

# supported class -> (family, kind): "tower" the text tower itself, "projection" the tower and its
# text projection
SUPPORTED = {
    "CLIPTextModel": ("clip", "tower"),
    "CLIPTextModelWithProjection": ("clip", "projection"),
    "SiglipTextModel": ("siglip", "tower"),
}
TOWERS = ("CLIPTextModel", "SiglipTextModel")
MODULES = ("transformers.modeling_outputs", *(f"transformers.models.{f}.modeling_{f}" for f in FAMILIES))
NUM_PREFIX = 2  # the pooled token, placed first for the pass, and the first of the others
AFTER_EOS = ("keep", "drop")  # CLIP's tokens after its EOS token: run as any other, or not run
LEGACY_EOS = 2  # a CLIP eos_token_id of 2 pools the largest id of each sequence (transformers' rule)
INPUTS = ("input_ids", "attention_mask", "position_ids")


def _claimed_class(cls: type) -> type | None:
    """The CLIP/SigLIP text class `cls` is (or derives from), or None."""
    found = family_class(cls, FAMILIES)
    return found if found is not None and found.__name__ in SUPPORTED else None


def _spec(model: nn.Module) -> tuple[str, str]:
    """(family, kind) of a claimed model, from its original class."""
    return spec_of(model, SUPPORTED, _claimed_class)


def _tower(model: nn.Module, kind: str) -> nn.Module:
    """The text tower (CLIPTextModel / SiglipTextModel): the model itself or its `text_model`."""
    return model if kind == "tower" else getattr(model, "text_model", None)


def tower_of(model: nn.Module) -> nn.Module:
    """The text tower of a claimed model."""
    return _tower(model, _spec(model)[1])


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not."""
    cls = _claimed_class(type(model)) if from_transformers(type(model)) else None
    if cls is None:
        raise UnsupportedModelError(f"model {type(model).__name__} is not a Hugging Face transformers CLIP or SigLIP "
                                    f"text model; supported: {', '.join(SUPPORTED)}")
    family, kind = SUPPORTED[cls.__name__]
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    link = model.__dict__.get("_tr_link")
    if link is not None:
        raise UnsupportedModelError(f"model {name} is the text tower of a token-reduced "
                                    f"{link.owner._tokenreduce.original_class.__name__}, which holds its reducer; "
                                    "call tokenreduce.remove on that model first, or apply to it")
    tower = _tower(model, kind)
    parts = ("embeddings", "encoder", "final_layer_norm") + (("head",) if family == "siglip" else ())
    layers = check_tower(model, name, tower, family, "text", parts)
    check_attention_implementation(name, tower.config, "the causal mask and proportional attention are a float mask, "
                                                       "which these take")
    return ModelInfo(name=name, depth=len(layers), num_prefix=NUM_PREFIX, has_class_token=True,
                     embed_dim=tower.config.hidden_size, num_heads=tower.config.num_attention_heads)


# --- the mask of a layer ---------------------------------------------------------------------------
@dataclass
class _Group:
    """What the layers of one group of sequences need besides their tokens (run_blocks' `extra`).

    positions: [B, m] long, the input position of each token entering the first layer (the pooled
               token first, then the others in order)
    hidden:    [B] bool, whether the pooled token is a padding position, which no token sees as a key;
               None when none is
    causal:    whether key j is visible to query i only when pos[j] <= pos[i] (CLIP)
    """

    positions: Tensor
    hidden: Tensor | None
    causal: bool

    def latest(self, state: ReductionState, n: int) -> Tensor:
        """[B, n] each of the `n` current tokens' position: the latest input position among the tokens
        it stands for (the source map holds, for every token of the first layer, its current token)."""
        out = self.positions.new_full((self.positions.shape[0], n + 1), -1)
        return out.scatter_reduce_(1, state.source, self.positions, "amax")[:, :n]

    def visible(self, state: ReductionState, n: int) -> Tensor | None:
        """[B, 1, n, n] bool: which keys each query sees; None when every one sees every one."""
        if not self.causal and self.hidden is None:
            return None
        if self.causal:
            pos = self.latest(state, n)
            visible = pos[:, None, :] <= pos[:, :, None]
        else:
            visible = torch.ones(len(self.positions), n, n, dtype=torch.bool, device=self.positions.device)
        if self.hidden is not None:  # the pooled token (first) is no key where it is padding
            visible[:, :, 0] &= ~self.hidden[:, None]
        return visible[:, None]

    def bias(self, state: ReductionState, bias: Tensor | None, n: int, dtype: torch.dtype) -> Tensor | None:
        """The float attention mask of `n` tokens: the proportional-attention `bias` ([B, 1, 1, n] or
        [B, 1, n, n], or None), and the dtype's lowest value where a key is not visible."""
        visible = self.visible(state, n)
        if visible is None:
            return bias
        base = visible.new_zeros(visible.shape, dtype=dtype) if bias is None else bias.expand(visible.shape)
        return base.masked_fill(~visible, torch.finfo(dtype).min)


class TextTowerOps(TowerLayerOps):
    """hf_clip's `TowerLayerOps` with the mask of the group's structure (causal, a hidden pooled token)
    added to every attention a step computes, from the tokens the state holds when it is computed.
    Attention probabilities handed in by a reducer (MCTF's merged map, DynamicViT's masked softmax)
    are cut to the visible keys and each row scaled back to the mass it had."""

    def __init__(self, layer: nn.Module, checkpointing: bool = False, state: ReductionState | None = None,
                 group: _Group | None = None):
        super().__init__(layer, checkpointing)
        self.state, self.group = state, group
        self._masked = False  # inside `attention`, whose bias is the whole mask already

    def _mask(self, bias: Tensor | None, n: int, dtype: torch.dtype) -> Tensor | None:
        if self.group is None or self._masked:
            return bias
        return self.group.bias(self.state, bias, n, dtype)

    def plain(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return super().plain(x, self._mask(bias, x.shape[1], x.dtype))

    def attention(self, x: Tensor, bias: Tensor | None, needs: frozenset[str]):
        return super().attention(x, self._mask(bias, x.shape[1], x.dtype), needs)

    def _attention_branch(self, h: Tensor, bias: Tensor | None, needs: frozenset[str]):
        # called by `attention` with the whole mask (again in the backward pass when it is checkpointed,
        # when the state has moved on): its probabilities come from masked logits and need no cut
        self._masked = True
        try:
            return super()._attention_branch(h, bias, needs)
        finally:
            self._masked = False

    def attn_logits(self, q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        return super().attn_logits(q, k, self._mask(bias, q.shape[2], q.dtype))

    def attn_output(self, probs: Tensor, v: Tensor, h: Tensor) -> Tensor:
        visible = None if self.group is None or self._masked else self.group.visible(self.state, probs.shape[-1])
        if visible is not None:
            kept = probs.masked_fill(~visible, 0)
            # rows that lost nothing are divided by exactly 1
            probs = kept / (1 - (probs - kept).sum(dim=-1, keepdim=True)).clamp_min(torch.finfo(probs.dtype).tiny)
        return super().attn_output(probs, v, h)


@dataclass
class _TextLoop(LayerLoop):
    """hf_vit's loop with the steps of `TextTowerOps`; the pass traces the source map, which the
    tokens' positions are read from."""

    ops: type = TextTowerOps

    def _tr_start(self, state: ReductionState, extra: _Group) -> None:
        if state.source is None:
            state.source = torch.arange(extra.positions.shape[1], device=extra.positions.device).expand(
                extra.positions.shape[0], -1).clone()

    def _tr_block_ops(self, block: nn.Module, state: ReductionState, extra: _Group, checkpointing: bool):
        return self.ops(block, checkpointing, state, extra)


# --- the pass --------------------------------------------------------------------------------------
def pooled_positions(tower: nn.Module, input_ids: Tensor, clip: bool) -> Tensor:
    """[B] the position each sequence pools, as transformers finds it: CLIP's first EOS token (the
    largest id with the legacy eos_token_id 2), SigLIP's last position."""
    batch, length = input_ids.shape
    if not clip:
        return torch.full((batch,), length - 1, dtype=torch.long, device=input_ids.device)
    ids = input_ids.to(torch.int)
    if tower.eos_token_id == LEGACY_EOS:
        return ids.argmax(dim=-1).long()
    return (ids == tower.eos_token_id).int().argmax(dim=-1).long()


def _plan(tower: nn.Module, reducer: nn.Module, clip: bool, after_eos: str, input_ids: Tensor,
          attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per sequence: the position it pools [B], the real tokens that run [B] (from the first; the pooled
    one among them unless it is padding), and whether the pooled token is padding [B]. Refuses, before
    any compute, what the pass cannot run."""
    batch, length = input_ids.shape
    why = ("its first token and the token it pools are kept by every reducer" if clip else
           "a token the pooled last position attends to")
    counts = real_counts(attention_mask, batch, length, input_ids.device, least=NUM_PREFIX if clip else 1, why=why)
    pooled = pooled_positions(tower, input_ids, clip)
    runs = torch.minimum(counts, pooled + 1) if after_eos == "drop" else counts
    hidden = pooled >= runs
    tokens = runs + hidden
    if clip and bool((runs > pooled + 1).any()) and any(getattr(m, "name", None) == "evit" for m in reducer.modules()):
        raise ConfigError("evit: its fused token is the mean of the tokens it drops weighted by the class token's "
                          "attention, which the pooled EOS token (the class token here) gives none of the tokens after "
                          "it (causal attention); allowed: adapter_options={'after_eos': 'drop'}, sequences that end "
                          "with their EOS token (or an attention_mask that ends there), or another reducer")
    if bool((tokens < NUM_PREFIX).any()):
        b = int((tokens < NUM_PREFIX).nonzero()[0])
        hint = f"; CLIP pools its EOS token (eos_token_id={tower.eos_token_id}), put after the first" if clip else ""
        raise ConfigError(f"input_ids row {b} pools its token at position {int(pooled[b])} and leaves "
                          f"{int(tokens[b])} token for the layers; allowed: at least 2 (the pooled token and another, "
                          f"both kept by every reducer){hint}")
    return pooled, runs, hidden


def _restore(y: Tensor, state: ReductionState, positions: Tensor, length: int) -> Tensor:
    """The tokens `y` the pass left, ordered by position, with their sizes and the source map (over
    the `length` input positions; a position that did not run, or was dropped, is dropped)."""
    n = y.shape[1]
    group = _Group(positions, None, False)
    order = group.latest(state, n).argsort(dim=1)  # positions are distinct: each input is in one token
    slot = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=y.device).expand_as(order))
    slot = torch.cat([slot, slot.new_full((len(slot), 1), n)], dim=1)  # n: dropped
    source = slot.gather(1, state.source)  # each token of the first layer's output slot
    state.source = source.new_full((len(source), length), n).scatter_(1, positions, source)
    sizes = torch.ones(*y.shape[:2], 1, device=y.device) if state.sizes is None else state.sizes
    state.sizes = sizes.gather(1, order[..., None])
    return y.gather(1, order[..., None].expand_as(y))


def run_tower(tower: nn.Module, owner: nn.Module, arguments: dict) -> tuple[Tensor, Tensor, ReductionState]:
    """Run the tower on each group of sequences with the same number of tokens in the pass; return the
    sequence after `final_layer_norm` in one zero-padded batch, the pooled token of each sequence
    (normed) and the pass's state (`groups` when the batch mixes lengths; sizes always, 0 for padding)."""
    clip = _spec(owner)[0] == "clip"
    input_ids = arguments["input_ids"]
    input_ids = input_ids.view(-1, input_ids.shape[-1])
    batch, length = input_ids.shape
    pooled_at, runs, hidden = _plan(tower, owner.token_reducer, clip, owner._tokenreduce.options["after_eos"],
                                    input_ids, arguments.get("attention_mask"))
    tokens = runs + hidden
    check_text_reducer(owner, tokens)
    layers = tower.encoder.layers
    loop = _TextLoop(owner.token_reducer, NUM_PREFIX, layers, bool(layers[0].gradient_checkpointing) and
                     layers[0].training)
    position_ids = arguments.get("position_ids")
    groups = []
    for m in tokens.unique().tolist():
        index = (tokens == m).nonzero().flatten()
        index = None if len(index) == batch else index  # None: the whole batch
        ids, pos_ids = input_ids, position_ids
        if index is not None:
            ids = ids[index]
            pos_ids = pos_ids[index] if pos_ids is not None and pos_ids.shape[0] == batch else pos_ids
        pooled = pooled_at if index is None else pooled_at[index]
        others = torch.arange(m - 1, device=ids.device)
        positions = torch.cat([pooled[:, None], others + (others >= pooled[:, None])], dim=1)  # pooled first
        hid = hidden if index is None else hidden[index]
        x = tower.embeddings(input_ids=ids, position_ids=pos_ids)
        x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        y, state, _ = run_blocks(loop, x, _Group(positions, hid if bool(hid.any()) else None, clip))
        y = tower.final_layer_norm(y)
        first = y[:, 0]
        y = _restore(y, state, positions, length)
        if not owner.token_reducer.trace_source:
            state.source = None
        groups.append((torch.arange(batch, device=ids.device) if index is None else index, y, state, first))
    if len(groups) == 1:
        _, sequence, state, pooled = groups[0]
        return sequence, pooled, state
    width = max(y.shape[1] for _, y, _, _ in groups)
    sequence = groups[0][1].new_zeros(batch, width, groups[0][1].shape[2])
    pooled = groups[0][3].new_empty(batch, groups[0][3].shape[1])
    for index, y, _, first in groups:
        sequence[index, : y.shape[1]] = y
        pooled[index] = first
    state = ReductionState.gather([g[:3] for g in groups], batch, length, width)
    return sequence, pooled, state


def _check_arguments(owner: nn.Module, tower: nn.Module, arguments: dict, extra: dict) -> None:
    """Refuse, before any compute, what a reduced pass cannot give, naming the argument."""
    who = refuse_outputs(owner, extra, tower)
    unknown = sorted(set(extra) - set(PASSED) - set(REFUSED_OUTPUTS))
    unknown += sorted(k for k, v in arguments.items() if k not in INPUTS and v is not None)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} not supported on the text tower of a {who}; allowed: input_ids, "
                          "attention_mask, position_ids and return_dict")
    if arguments.get("input_ids") is None:
        raise ConfigError(f"input_ids=None is invalid for a {who}; allowed: a [B, L] tensor of token ids")


class _ReducedTextTower:
    """Methods placed in front of the text tower's own class (CLIPTextModel, SiglipTextModel) while the
    model is patched (the adapter adds a `forward` that keeps the class's own signature and calls
    `_tr_forward`)."""

    def _tr_forward(self, original, *args, **kwargs):
        arguments, extra = bind(original, self, args, kwargs)
        owner = owner_of(self)
        _check_arguments(owner, self, arguments, extra)
        sequence, pooled, state = run_tower(self, owner, arguments)
        owner._tokenreduce.last_state = state
        if hasattr(self, "head"):  # SigLIP
            pooled = self.head(pooled)
        output = import_transformers("transformers.modeling_outputs").BaseModelOutputWithPooling(
            last_hidden_state=sequence, pooler_output=pooled)
        return_dict = extra.get("return_dict")
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


# --- cost --------------------------------------------------------------------------------------
def pass_macs(model: nn.Module, state: ReductionState) -> dict[str, int]:
    """MACs of one sequence for the pass that left `state` (the embeddings are lookups: no MACs), with
    SigLIP's head and the text projection of a projection model on the pooled token."""
    family, kind = _spec(model)
    tower = _tower(model, kind)
    costs = block_costs(tower.encoder.layers, tower.config.hidden_size, TowerLayerOps)
    heads = [getattr(tower, "head", None), getattr(model, "text_projection", None)]
    return macs_parts(0, costs, state.records, sum(linear_macs(m) for m in heads if m is not None))


@register_adapter("hf_clip_text")
class HFCLIPTextAdapter(HFCLIPAdapter):  # hf_clip's patching: a tower, or a model holding one
    family = f"Hugging Face transformers CLIP and SigLIP text towers ({', '.join(SUPPORTED)})"
    reduced_methods = _ReducedTextTower
    options = {"after_eos": AFTER_EOS}
    towers = TOWERS
    tower_of = staticmethod(tower_of)

    claimed_class = staticmethod(_claimed_class)
    model_info = staticmethod(describe)
    model_macs = staticmethod(pass_macs)
