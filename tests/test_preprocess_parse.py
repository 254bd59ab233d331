"""Line parsing and checking (preprocess/parse.py), without Spark."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preprocess import parse
from tests.conftest import criteo_line


def _rows(seed: int, n: int) -> list[tuple[int, list[str], list[str]]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, 2)),
             ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 1000))) for _ in range(13)],
             ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 1 << 32)):08x}" for _ in range(26)])
            for _ in range(n)]


def _line(label="1", ints=None, cats=None) -> str:
    return "\t".join([label, *(ints or ["1"] * 13), *(cats or ["0000abcd"] * 26)])


@pytest.mark.parametrize(
    "line, ok",
    [
        (_line(), True),
        (_line(ints=[""] * 13, cats=[""] * 26), True),
        (_line(ints=["-5", "007", "123456789012345678", "-123456789012345678"] + ["0"] * 9), True),
        (_line(cats=["ABCDEF01", "ffffffff"] + [""] * 24), True),
        (_line(label="01"), False),
        (_line(label="2"), False),
        (_line(label=""), False),
        (_line(ints=["+5"] + ["1"] * 12), False),
        (_line(ints=[" 5"] + ["1"] * 12), False),
        (_line(ints=["0x10"] + ["1"] * 12), False),
        (_line(ints=["1234567890123456789"] + ["1"] * 12), False),  # 19 digits
        (_line(ints=["0000000000000000001"] + ["1"] * 12), False),  # 19 digits, small value
        (_line(ints=["-"] + ["1"] * 12), False),
        (_line(ints=["1-2"] + ["1"] * 12), False),
        (_line(ints=["--1"] + ["1"] * 12), False),
        (_line(ints=["1.5"] + ["1"] * 12), False),
        (_line(cats=["0000abc"] + ["0000abcd"] * 25), False),
        (_line(cats=["0000abcg"] + ["0000abcd"] * 25), False),
        (_line(cats=["0000abcd0"] + ["0000abcd"] * 25), False),
        (_line() + "\textra", False),
        ("1\t2\t3", False),
        ("", False),
    ],
)
def test_parse_rules(line, ok):
    buf = (_line() + "\n" + line + "\n" + _line() + "\n").encode()
    parsed = parse.parse_chunk(buf)
    assert (len(parsed), parsed.rejected) == ((3, 0) if ok else (2, 1))
    if not ok:
        assert parsed.sample == [line]


def test_a_line_that_is_not_utf8_is_rejected_alone():
    buf = (_line() + "\n").encode() + b"1\t\xff" + (_line()[1:] + "\n").encode()[2:] + (_line() + "\n").encode()
    parsed = parse.parse_chunk(buf)
    assert (len(parsed), parsed.rejected) == (2, 1)
    assert "\ufffd" in parsed.sample[0]


def test_a_line_of_the_wrong_shape_that_is_not_utf8_is_rejected_alone():
    # Arrow hands such a line to Python as text; undecodable, it used to fail the whole chunk
    buf = (_line() + "\n").encode() + b"1\t\xff\t2\n" + (_line() + "\n").encode()
    parsed = parse.parse_chunk(buf)
    assert (len(parsed), parsed.rejected, parsed.sample) == (2, 1, ["1\t\ufffd\t2"])
    assert parsed.table.equals(parse.parse_chunk(((_line() + "\n") * 2).encode()).table)


def test_parsed_values_are_exact():
    lines = [_line("0", ["", "-3", "999999999999999999"] + ["0"] * 10,
                   ["ffffffff", "", "0000000a"] + ["00000001"] * 23),
             _line("1", ["1"] * 13, ["DEADBEEF"] + [""] * 25)]
    columns = parse.parse_chunk(("\n".join(lines) + "\n").encode()).table.to_pydict()
    assert columns["label"] == [0, 1]
    assert [columns[f"i{j}"][0] for j in range(3)] == [0.0, 0.0, np.float32(math.log1p(999999999999999999))]
    assert parse.parse_chunk(("\n".join(lines) + "\n").encode()).table.schema == parse.PARSED_ARROW
    assert columns["c0"] == [0xFFFFFFFF, 0xDEADBEEF]
    assert columns["c1"] == [None, None]
    assert columns["c2"] == [10, None]
    hashed = parse.parse_chunk(("\n".join(lines) + "\n").encode(), max_ind_range=1000)
    assert hashed.table.column("c0").to_pylist() == [0xFFFFFFFF % 1000, 0xDEADBEEF % 1000]


def test_large_chunks_are_parsed_in_pieces(monkeypatch):
    monkeypatch.setattr(parse, "PIECE_BYTES", 1000)
    lines = [criteo_line(*r) for r in _rows(5, 60)] + ["bad\n"] + [criteo_line(*r) for r in _rows(6, 60)]
    whole = "".join(lines).encode()
    parsed = parse.parse_chunk(whole)
    assert (len(parsed), parsed.rejected, parsed.sample) == (120, 1, ["bad"])
    assert parsed.table.column("label").num_chunks > 10
    monkeypatch.setattr(parse, "PIECE_BYTES", 1 << 30)
    assert parsed.table.equals(parse.parse_chunk(whole).table)
