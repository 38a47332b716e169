import pytest

from tokenreduce.core.schedule import Schedule, half_cap, keep_ratio_removal, token_counts
from tokenreduce.errors import ConfigError

PATCHES = 196  # ViT-B/16 or DeiT at 224


def tokens_with_cls(schedule, layers=12, patches=PATCHES):
    return [t + 1 for t in token_counts(patches, schedule.removal_counts(layers, patches))]


@pytest.mark.parametrize("r, final", [(8, 101), (13, 41), (16, 11)])
def test_constant_r_ends_at_published_counts(r, final):
    assert tokens_with_cls(Schedule(r=r))[-1] == final


def test_r16_is_capped_at_half_in_the_last_layers():
    assert Schedule(r=16).removal_counts(12, PATCHES) == [16] * 11 + [10]


@pytest.mark.parametrize("form", [dict(r=16, inflect=-1), dict(r=(16, -1))])
def test_decreasing_schedule(form):
    counts = Schedule(**form).removal_counts(12, PATCHES)
    assert counts[:2] == [32, 29] and counts[-2:] == [2, 0]
    assert counts == sorted(counts, reverse=True)
    assert tokens_with_cls(Schedule(**form))[-1] == 10


def test_inflect_zero_is_constant():
    assert Schedule(r=8, inflect=0).removal_counts(12, PATCHES) == [8] * 12


def test_list_is_padded_with_zeros():
    assert Schedule(r=[5, 4]).removal_counts(4, PATCHES) == [5, 4, 0, 0]


@pytest.mark.parametrize("ratio, expected", [
    (0.9, [196, 177, 160, 144, 130, 117, 106, 96, 87, 79, 72, 65, 59]),
    (0.925, [196, 182, 169, 157, 146, 136, 126, 117, 109, 101, 94, 87, 81]),
])
def test_keep_ratio_fixtures(ratio, expected):
    assert token_counts(PATCHES, Schedule(ratio=ratio).removal_counts(12, PATCHES)) == expected


def test_staged_keep_rate_only_at_chosen_layers():
    counts = Schedule(ratio=0.7, layers=[3, 6, 9]).removal_counts(12, PATCHES)
    # ceil(0.7 * 196) = 138 kept, ceil(0.7 * 138) = 97, ceil(0.7 * 97) = 68
    assert [i for i, c in enumerate(counts) if c] == [3, 6, 9]
    assert token_counts(PATCHES, counts)[-1] == 68


def test_layers_restrict_constant_r():
    assert Schedule(r=4, layers=[1, 2]).removal_counts(4, 20) == [0, 4, 4, 0]


def test_layers_restrict_a_per_layer_list():
    assert Schedule(r=[1, 2, 3, 4], layers=[1, 3]).removal_counts(4, 20) == [0, 2, 0, 4]


def test_cap_is_half_of_the_tokens_entering_each_layer():
    assert Schedule(r=100).removal_counts(3, 10) == [5, 2, 1]
    assert half_cap(7) == 3 and keep_ratio_removal(196, 0.925) == 14


def test_ratio_one_and_r_zero_remove_nothing():
    assert Schedule(ratio=1.0).removal_counts(12, PATCHES) == [0] * 12
    assert Schedule(r=0).removes_nothing and Schedule(ratio=1.0).removes_nothing
    assert not Schedule(r=[0, 1]).removes_nothing


@pytest.mark.parametrize("kwargs, words", [
    (dict(r=-1), ["r=-1", ">= 0"]),
    (dict(r=[3, -2]), ["r=[3, -2]", "a list of integers >= 0"]),  # the value as given, not its bad entry
    (dict(r=2.5), ["r=2.5"]),
    (dict(ratio=0.0), ["ratio=0.0", "(0, 1]"]),
    (dict(ratio=1.5), ["ratio=1.5", "(0, 1]"]),
    (dict(r=4, ratio=0.9), ["either r", "ratio"]),
    (dict(r=[1, 2], inflect=-1), ["inflect"]),
    (dict(r=(1, 2, 3)), ["tuple must be (r, inflect)"]),
    (dict(r=4, layers=[-1]), ["layers=[-1]"]),
    # a string is one bad value, not a list of its characters (r=abc on the command line)
    (dict(r="abc"), ["r='abc' is invalid; allowed: an integer >= 0"]),
    (dict(r=[1, "a"]), ["r=[1, 'a'] is invalid"]),
    (dict(r=2, layers="abc"), ["layers='abc' is invalid; allowed: a list of integers >= 0"]),
    (dict(r=2, layers=5), ["layers=5 is invalid"]),
])
def test_bad_schedules_are_refused_with_the_value(kwargs, words):
    with pytest.raises(ConfigError) as err:
        Schedule(owner="tome", **kwargs)
    assert all(w in str(err.value) for w in words) and "tome" in str(err.value)


def test_depth_errors_name_the_model_depth():
    with pytest.raises(ConfigError, match="13 entries but the model has 12 blocks"):
        Schedule(r=[1] * 13).removal_counts(12, PATCHES)
    with pytest.raises(ConfigError, match="beyond the model's 12 blocks"):
        Schedule(r=1, layers=[12]).check_depth(12)


def test_r_at_its_default_zero_gives_way_to_a_ratio():
    assert Schedule(r=0, ratio=0.9).removal_counts(12, PATCHES) == Schedule(ratio=0.9).removal_counts(12, PATCHES)
