"""Different reducers in different layers of one model: `compose`."""

from __future__ import annotations

from torch import Tensor

from tokenreduce.core.schedule import Schedule
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, check_numbers
from tokenreduce.reducers.base import TokenReducer, create_reducer, reducer_defaults, register_reducer

# their schedules or state span the whole pass: MCTF reuses one layer's attention in the next and
# caps by the tokens of the pass, DynamicViT's predictors belong to fixed stages
NOT_COMPOSABLE = {
    "mctf": "its one-step-ahead attention and its token floor span layers it would not own",
    "dynamicvit": "its trained score predictors belong to fixed stages of the whole pass",
    "compose": "a composition is already per layer: list its parts instead",
}


# Top-K's pruning in block 3, then ToMe (the composition conf/reducer/compose.yaml names)
DEFAULT_PARTS = ({"name": "topk", "layers": [3], "ratio": 0.8},
                 {"name": "tome", "layers": [4, 5, 6, 7, 8, 9, 10, 11], "r": 8})


@register_reducer("compose")
class Compose(TokenReducer):
    """Run each part's reducer in the layers it owns; the other layers are left unreduced.

    parts:        a list of {"name": reducer, "layers": [owned layers, 0-based], **its parameters},
                  e.g. [{"name": "topk", "layers": [3], "ratio": 0.8}, {"name": "tome", "layers":
                  [4, 5, 6, 7, 8, 9, 10, 11], "r": 8}]; a part whose reducer has a `layers`
                  parameter gets its owned layers there
    prop_attn:    proportional attention for the whole pass (one setting: sizes are shared)
    trace_source: keep the map from input patches to tokens through every part

    Each layer's removal is its owner's for the tokens that actually enter it, so a part sees the
    tokens the parts before it left; one pass state, one `stats` and one MAC count cover all parts.
    """

    def __init__(self, parts: list[dict] | tuple[dict, ...] = DEFAULT_PARTS, prop_attn: bool = True,
                 trace_source: bool = False):
        super().__init__(Schedule(r=0, owner="compose"), prop_attn=prop_attn, trace_source=trace_source)
        if not isinstance(parts, (list, tuple)) or not parts:
            raise ConfigError(f"compose: parts={parts!r} is invalid; allowed: a non-empty list of "
                              "{name: reducer, layers: [...], ...parameters}")
        self.parts, owner = [], {}
        for index, spec in enumerate(parts):
            if not isinstance(spec, dict) or "name" not in spec or "layers" not in spec:
                raise ConfigError(f"compose: parts[{index}]={spec!r} is invalid; allowed: "
                                  "{name: reducer, layers: [...], ...parameters}")
            spec = dict(spec)
            name, layers = spec.pop("name"), check_numbers("compose", f"parts[{index}].layers", spec.pop("layers"),
                                                           low=0, integer=True)
            if name in NOT_COMPOSABLE:
                raise ConfigError(f"compose: parts[{index}] is {name}, which cannot be composed: {NOT_COMPOSABLE[name]}")
            if "layers" in reducer_defaults(name):
                spec["layers"] = layers
            for layer in layers:
                if layer in owner:
                    raise ConfigError(f"compose: layer {layer} is in parts[{owner[layer]}] and parts[{index}]; "
                                      "allowed: each layer in at most one part")
                owner[layer] = index
            self.parts.append(create_reducer(name, **spec, trace_source=trace_source))
        self.owner = owner
        # the parts are modules of this one, so their weights (if any) follow the model
        for index, part in enumerate(self.parts):
            self.add_module(f"part{index}", part)

    def _part(self, layer: int) -> TokenReducer | None:
        index = self.owner.get(layer)
        return None if index is None else self.parts[index]

    def check_model(self, info) -> None:
        beyond = sorted(layer for layer in self.owner if layer >= info.depth)
        if beyond:
            raise ConfigError(f"compose: layers {beyond} reach beyond the model's {info.depth} blocks; "
                              f"allowed: 0 .. {info.depth - 1}")
        for part in self.parts:
            part.check_model(info)

    def removal_counts(self, num_layers: int, num_tokens: int) -> list[int]:
        counts, tokens = [], num_tokens
        for layer in range(num_layers):
            part = self._part(layer)
            removal = 0 if part is None else part.removal_at(layer, num_layers, tokens)
            counts.append(removal)
            tokens -= removal
            if removal and part.refill:
                tokens += part.refill
        return counts

    def acts_at(self, layer: int, removal: int) -> bool:
        part = self._part(layer)
        return part is not None and part.acts_at(layer, removal)

    def block_forward(self, ops, x: Tensor, state: ReductionState, layer: int, removal: int) -> Tensor:
        return self._part(layer).block_forward(ops, x, state, layer, removal)

    def training_losses(self, context) -> dict[str, Tensor]:
        return {f"part{i}.{name}": value for i, part in enumerate(self.parts)
                for name, value in part.training_losses(context).items()}
