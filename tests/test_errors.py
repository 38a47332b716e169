"""The shared parameter checks behind every reducer's ConfigError."""

import math

import pytest

import tokenreduce
from tokenreduce.errors import ConfigError, check_flag, check_number, check_numbers


def test_check_flag_takes_only_bools():
    assert check_flag("r", "x", True) is True and check_flag("r", "x", False) is False
    for bad in (1, 0, "yes", None):
        with pytest.raises(ConfigError, match=r"r: x=.* is invalid; allowed: true or false"):
            check_flag("r", "x", bad)


@pytest.mark.parametrize("value, kwargs, allowed", [
    (-1, dict(low=0, integer=True), "an integer >= 0"),
    (2.0, dict(low=0, integer=True), "an integer >= 0"),
    (True, dict(low=0, integer=True), "an integer >= 0"),
    (0, dict(low=0, low_open=True), "a number > 0"),
    (1.5, dict(low=0.0, high=1.0), "a number in [0.0, 1.0]"),
    (0, dict(low=0, high=1, low_open=True), "a number in (0, 1]"),
    (math.nan, dict(), "a number"),
    (math.inf, dict(low=0, finite=True), "a number >= 0"),
    ("3", dict(low=0), "a number >= 0"),
])
def test_check_number_refuses_with_what_is_allowed(value, kwargs, allowed):
    with pytest.raises(ConfigError) as err:
        check_number("mctf", "tau", value, **kwargs)
    assert str(err.value) == f"mctf: tau={value!r} is invalid; allowed: {allowed}"


@pytest.mark.parametrize("value, kwargs", [
    (0, dict(low=0, integer=True)), (1.0, dict(low=0.0, high=1.0)), (math.inf, dict(low=0)),
    (1e-9, dict(low=0, low_open=True)), (-5.5, dict()),
])
def test_check_number_returns_what_it_accepts(value, kwargs):
    assert check_number("mctf", "tau", value, **kwargs) == value


@pytest.mark.parametrize("value, allowed", [
    ("abc", "a list of integers >= 0"),  # a string is one value, not a list of its characters
    ([3, -2], "a list of integers >= 0"),
    ([1, "a"], "a list of integers >= 0"),
    (5, "a list of integers >= 0"),
])
def test_check_numbers_quotes_the_whole_value(value, allowed):
    with pytest.raises(ConfigError) as err:
        check_numbers("tome", "layers", value, low=0, integer=True)
    assert str(err.value) == f"tome: layers={value!r} is invalid; allowed: {allowed}"
    assert check_numbers("tome", "layers", (0, 3), low=0, integer=True) == [0, 3]


# every parameter that takes a count, a layer list or a list of ratios (reducer.r=abc on the command line)
LIST_LIKE = ("r", "layers", "ratios", "prune_layers", "layer_modes")


@pytest.mark.parametrize("name, param", [(n, p) for n in tokenreduce.available()
                                         for p in tokenreduce.reducer_defaults(n) if p in LIST_LIKE])
def test_a_string_is_reported_as_given(name, param):
    with pytest.raises(ConfigError, match=f"^{name}: {param}='abc' is invalid; allowed: "):
        tokenreduce.create_reducer(name, **{param: "abc"})
