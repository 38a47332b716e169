"""Reducers, one file per method family; importing this package registers them all."""

from tokenreduce.reducers import atc, compose, dynamicvit, mctf, mstm, none, pitome, ppt, pruning, tofu, tome  # noqa: F401
from tokenreduce.reducers.base import (
    TokenReducer,
    available,
    create_reducer,
    reducer_class,
    reducer_defaults,
    register_reducer,
)

__all__ = ["TokenReducer", "available", "create_reducer", "reducer_class", "reducer_defaults", "register_reducer"]
