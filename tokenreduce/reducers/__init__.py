"""Reducers, one file per method family; importing this package registers them all."""

from tokenreduce.reducers import (  # noqa: F401
    atc,
    compose,
    diffrate,
    dynamicvit,
    mctf,
    mstm,
    none,
    pitome,
    ppt,
    pruning,
    todo,
    tofu,
    tome,
    tomesd,
    vlm,
    zerotprune,
)
from tokenreduce.reducers.base import (
    TokenReducer,
    available,
    create_reducer,
    reducer_class,
    reducer_defaults,
    register_reducer,
)

__all__ = ["TokenReducer", "available", "create_reducer", "reducer_class", "reducer_defaults", "register_reducer"]
