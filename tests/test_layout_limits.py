"""``layers[].at`` is bounded by the model's depth, whatever the recipe, ``--set`` or a checkpoint says.

The threats: a string of many long ranges (``"0-9999,0-9999,..."``) expanded every range before
de-duplicating and ended in MemoryError after 4.8 GB; ``"１"`` (a fullwidth digit) selected block 1.
"""
from __future__ import annotations

import tracemalloc

import pytest

import vitlab
from vitlab.errors import SpecError
from vitlab.layout import parse_at

from conftest import TINY


@pytest.mark.parametrize("at", ["１", "٣", "0-３", "1\u00a0", "²"])
def test_only_ascii_digits_select_blocks(at):
    with pytest.raises(ValueError, match="is not an index or a range"):
        parse_at(at, 12)


def test_many_long_ranges_cost_no_more_than_the_depth():
    at = ",".join(["0-9999"] * 100_000)  # 700 KB of text naming 10⁹ indices
    tracemalloc.start()
    try:
        assert parse_at(at, 10_000) == list(range(10_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # the spans and one list of depth entries, not 10⁹ ints


def test_a_number_of_thousands_of_digits_is_refused_before_int():
    with pytest.raises(ValueError, match="does not exist"):
        parse_at("0-" + "9" * 50_000, 12)  # int() of it would raise (or take long) first


@pytest.mark.parametrize("at, expected", [("0-5,8", [0, 1, 2, 3, 4, 5, 8]), ("3,1-2,2", [1, 2, 3]), (4, [4]),
                                          ([5, 0, 5], [0, 5]), (" 1 - 2 ", [1, 2])])
def test_indices_and_ranges(at, expected):
    assert parse_at(at, 12) == expected


def test_a_huge_at_through_set_is_one_error():
    with pytest.raises(SpecError, match="layers"):
        vitlab.load_spec({**TINY, "layers": [{"at": ",".join(["0-1"] * 50_000) + ",7", "mlp_ratio": 2.0}]})
