"""Errors raised before any compute, each naming the parameter, the value and what is allowed."""

import math
import numbers


class ConfigError(ValueError):
    """A reducer, schedule or run parameter has a value that is not allowed."""


class UnsupportedModelError(TypeError):
    """The model lacks a piece the adapter needs, so reducing it would give a wrong output."""


def check_flag(who: str, name: str, value) -> bool:
    """`value` must be a real bool (a config's 1 or "yes" is refused, not guessed)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{who}: {name}={value!r} is invalid; allowed: true or false")
    return value


def check_number(who: str, name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False, finite: bool = False):
    """`value` must be a number (an int when `integer`) within `low`..`high`; NaN never passes.

    low_open: `low` itself is excluded; finite: infinities are refused too.
    """
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        allowed = f"{kind} in {'(' if low_open else '['}{low}, {high}]"
    elif low is not None:
        allowed = f"{kind} {'>' if low_open else '>='} {low}"
    else:
        allowed = kind
    ok = isinstance(value, int if integer else numbers.Real) and not isinstance(value, bool)
    ok = ok and value == value and not (finite and math.isinf(value))
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        raise ConfigError(f"{who}: {name}={value!r} is invalid; allowed: {allowed}")
    return value
