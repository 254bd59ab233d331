"""Byte ranges of the input files and their grouping into tasks (preprocess/ranges.py), without Spark."""

from __future__ import annotations

import pytest

from preprocess import ranges
from tests.conftest import write_day


@pytest.mark.parametrize("range_bytes", [1, 7, 100, 4096, 1 << 20])
def test_input_ranges_cover_every_line_once(tmp_path, range_bytes):
    lines = [f"{i}\t" + "x" * (i % 13) + "\n" for i in range(300)] + ["\n", "last line without newline"]
    day = tmp_path / "day_0"
    day.write_text("".join(lines))
    empty = write_day(tmp_path / "day_1", [])
    planned = ranges.plan_ranges([day, empty], [day], range_bytes)
    assert [r.index for r in planned] == list(range(len(planned)))
    train = b"".join(c for r in planned if r.train and r.path == str(day) for c in ranges.read_chunks(r))
    assert train == day.read_bytes()
    assert all(not list(ranges.read_chunks(r)) for r in planned if r.path == str(empty))
    assert [r.train for r in planned].count(False) == max(1, -(-day.stat().st_size // range_bytes))


def test_groups_hold_every_range_once_and_balance_the_bytes():
    sizes = [32, 32, 32, 32, 32, 32, 32, 5, 32, 32, 32, 32, 32, 32, 32, 3]
    groups = ranges.group_ranges(sizes, 6)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert all(g == sorted(g) for g in groups) and len(groups) == 6
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= 32
    assert ranges.group_ranges(sizes, 100) == [[i] for i in range(len(sizes))]  # never more groups than ranges
    assert ranges.group_ranges([7], 4) == [[0]]
