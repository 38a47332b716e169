"""The public entry points: apply a reducer to a model, remove it, read what the last pass did."""

from __future__ import annotations

from torch import Tensor, nn

from tokenreduce.adapters import adapter_for, is_patched
from tokenreduce.adapters.base import model_of
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import TokenReducer, create_reducer


def apply(model: nn.Module, reducer: str | TokenReducer, adapter_options: dict | None = None, **params) -> nn.Module:
    """Make `model` reduce its tokens with `reducer` (a registered name or an instance).

    Returns the same model, whose `forward` still returns logits. Applying to a model that already
    reduces replaces its reducer; nothing is patched twice. Every check runs before the model is
    touched, so a bad argument leaves it as it was.

    The model's family is found by the adapter that claims it (`tokenreduce.adapters`);
    `adapter_options` are that adapter's settings, e.g. `{"merged_position": "mean"}` for timm Eva
    models (how a merged token's RoPE position is set; see docs/adapters.md); when None, a model
    that already reduces keeps its options. `params` go to the reducer.
    """
    if isinstance(reducer, TokenReducer):
        if params:
            raise ConfigError(f"parameters {sorted(params)} given with a reducer instance; set them on the instance")
    else:
        reducer = create_reducer(reducer, **params)
    given, model = model, model_of(model)  # a container (a diffusers pipeline) is reduced in its model
    adapter = adapter_for(model)
    patched = is_patched(model)
    info = model._tokenreduce.info if patched else adapter.describe(model)
    # re-applying keeps the options unless new ones are given (e.g. a matched-cost search that swaps reducers)
    options = model._tokenreduce.options if patched and adapter_options is None else adapter.check_options(adapter_options)
    adapter.check_reducer(model, reducer, info, options)  # first: a method the family cannot place says why
    reducer.check_model(adapter.reducer_info(model, reducer, info))  # the facts of the part the reducer runs in
    if patched:
        adapter.unpatch(model)
    param = next(model.parameters(), None)
    if param is not None:  # a reducer's own weights follow the model's device, dtype and mode
        reducer.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    reducer.train(model.training)
    adapter.patch(model, reducer, info, options)
    return given


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: the model is again its original class with its original forward."""
    given, model = model, model_of(model)
    if is_patched(model):
        model._tokenreduce.adapter.unpatch(model)
    return given


def reducer_of(model: nn.Module) -> TokenReducer | None:
    """The reducer applied to `model`, or None."""
    model = model_of(model)
    return model.token_reducer if is_patched(model) else None


def stats(model: nn.Module) -> dict:
    """What the model's last forward pass did, per image.

    tokens:       tokens (prefix included) through each block's attention, then leaving the last
                  block (a block that reduces its own input attends over the reduced tokens)
    removed:      tokens each block removed, wherever in the block it removed them
    macs:         multiply-accumulates of one image, and its parts (embed, blocks, reducer, head)
    groups:       only for a padded NaFlexViT batch, run in groups of images with the same number of
                  real patches: per group its `images` and the keys above for one of its images;
                  `tokens`/`removed` above are then those of the images that set the batch's width,
                  and `macs` the mean over the batch's images
    source:       with a reducer built with `trace_source=True`, a [B, N_in] long tensor: for every
                  input token (prefix tokens first, then the patches in timm's row-major order) the
                  index of the output token, leaving the last block, that it ended in; -1 for a token
                  that was dropped (pruned). None when the reducer does not trace sources.
    """
    model = model_of(model)
    if not is_patched(model):
        raise ConfigError("stats(model): the model has no reducer; call tokenreduce.apply(model, ...) first")
    state = model._tokenreduce.last_state
    if state is None:
        raise ConfigError("stats(model): the model has not run a forward pass since tokenreduce.apply")
    adapter = model._tokenreduce.adapter
    own = adapter.pass_stats(model, state)
    if own is not None:  # a family whose passes are not a chain of shrinking blocks (a diffusion U-Net)
        return {"reducer": model.token_reducer.name, "params": model.token_reducer.params(), **own}
    result = {"reducer": model.token_reducer.name, "params": model.token_reducer.params(),
              **adapter.chain_stats(model, state), "source": _public_source(state)}
    if state.groups:  # a padded batch run in groups: per image, and MACs averaged over the images
        per_group = [(index, adapter.chain_stats(model, group)) for index, group in state.groups]
        images = sum(len(index) for index, _ in per_group)
        parts = {key: round(sum(len(index) * s["macs_parts"][key] for index, s in per_group) / images)
                 for key in result["macs_parts"] if key != "total"}
        result["macs_parts"] = {**parts, "total": sum(parts.values())}
        result["macs"] = result["macs_parts"]["total"]
        result["groups"] = [{"images": index.tolist(), **s} for index, s in per_group]
    return result


def _public_source(state) -> Tensor | None:
    # the state marks a dropped token with the current token count, which moves with every merge;
    # -1 means dropped whatever the number of output tokens
    if state.source is None:
        return None
    return state.source.masked_fill(state.source == state.final_tokens, -1)
