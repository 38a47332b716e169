"""The identity reducer: the unreduced model, measured the same way as every other."""

from __future__ import annotations

from tokenreduce.core.schedule import Schedule
from tokenreduce.reducers.base import TokenReducer, register_reducer


@register_reducer("none")
class NoReduction(TokenReducer):
    """Removes nothing; every block runs as timm defines it. The baseline of every comparison."""

    def __init__(self):
        super().__init__(Schedule(r=0, owner=self.name), prop_attn=False)

    def acts_at(self, layer: int, removal: int) -> bool:
        return False
