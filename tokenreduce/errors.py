"""Errors raised before any compute, each naming the parameter, the value and what is allowed."""


class ConfigError(ValueError):
    """A reducer, schedule or run parameter has a value that is not allowed."""


class UnsupportedModelError(TypeError):
    """The model lacks a piece the adapter needs, so reducing it would give a wrong output."""
