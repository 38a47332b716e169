"""Errors raised before any compute, each naming the parameter, the value and what is allowed."""

import math
import numbers
from collections.abc import Sequence


class ConfigError(ValueError):
    """A reducer, schedule or run parameter has a value that is not allowed."""


class UnsupportedModelError(TypeError):
    """The model lacks a piece the adapter needs, so reducing it would give a wrong output."""


class UnclaimedModelError(ConfigError, UnsupportedModelError):
    """No adapter claims the model (a ConfigError; also an UnsupportedModelError, as it was before
    adapters were chosen by a registry)."""


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
    if not _number_ok(value, low, high, low_open, integer, finite):
        raise ConfigError(f"{who}: {name}={value!r} is invalid; allowed: "
                          f"{_number_rule(low, high, low_open, integer)}")
    return value


def check_numbers(who: str, name: str, value, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, integer: bool = False, finite: bool = False) -> list:
    """`value` must be a list (see `is_list`) of numbers, each as `check_number` allows; returned as a list.

    A string is refused whole rather than read as a list of its characters, and the message quotes
    the whole value as given, not the first bad entry.
    """
    if not (is_list(value) and all(_number_ok(v, low, high, low_open, integer, finite) for v in value)):
        raise ConfigError(f"{who}: {name}={value!r} is invalid; allowed: a list of "
                          f"{_number_rule(low, high, low_open, integer, plural=True)}")
    return list(value)


def is_list(value) -> bool:
    """A list, tuple or other sequence, but not a string: "abc" is one bad value, not three."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _number_ok(value, low, high, low_open, integer, finite) -> bool:
    ok = isinstance(value, int if integer else numbers.Real) and not isinstance(value, bool)
    ok = ok and value == value and not (finite and math.isinf(value))
    return ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)


def _number_rule(low, high, low_open, integer, plural: bool = False) -> str:
    """What `_number_ok` allows, in words: "an integer >= 0", "numbers in (0, 1]"."""
    kind = ("integers" if integer else "numbers") if plural else ("an integer" if integer else "a number")
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    return kind
