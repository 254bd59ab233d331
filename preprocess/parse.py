"""Parsing and checking Criteo lines, vectorised over a chunk of whole lines (runs on the executors).

Arrow's C++ CSV reader cuts the lines into 40 binary fields (binary, not
string: no UTF-8 check, so one odd byte rejects its line, not the chunk);
NumPy then checks and converts every field of the chunk at once. A line that
breaks a rule is rejected and counted, and the text of the first few is kept
for the user: the chunk is never rejected as a whole.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from bench.config import NUM_DENSE, NUM_SPARSE

NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
DENSE = [f"i{j}" for j in range(NUM_DENSE)]
SPARSE = [f"c{j}" for j in range(NUM_SPARSE)]
REJECT_SAMPLE = 20  # rejected lines kept as text, per range and in the manifest
PARSED_ARROW = pa.schema(
    [("label", pa.uint8())] + [(c, pa.float32()) for c in DENSE] + [(c, pa.uint32()) for c in SPARSE]
)

# Hex digit -> value (255: not hex); then every pair of bytes -> the byte they spell (256: not hex).
_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _ch in enumerate(b"0123456789abcdef"):
    _HEX[_ch] = _i
for _i, _ch in enumerate(b"ABCDEF"):
    _HEX[_ch] = 10 + _i
_PAIR = np.arange(1 << 16)
_HEX_PAIRS = np.where((_HEX[_PAIR & 0xFF] == 255) | (_HEX[_PAIR >> 8] == 255), 256,
                      (_HEX[_PAIR & 0xFF].astype(np.uint16) << 4) | _HEX[_PAIR >> 8]).astype(np.uint16)
_NOT_DECIMAL = np.ones(256, dtype=bool)
_NOT_DECIMAL[np.frombuffer(b"0123456789-", np.uint8)] = False
_MINUS = ord("-")


class Parsed:
    """One chunk of lines, parsed and checked: the typed columns of the valid rows (``PARSED_ARROW``,
    one record batch per piece), and the count and first few texts of the rejected lines.

    ``i0..i12`` are already ``log(1 + max(x, 0))`` (missing -> 0) as float32; ``c0..c25`` hold the
    category values (``% max_ind_range`` when set) as uint32, null where missing.
    """

    def __init__(self, table: pa.Table, rejected: int, sample: list[str]):
        self.table, self.rejected, self.sample = table, rejected, sample

    def __len__(self) -> int:
        return self.table.num_rows


PIECE_BYTES = 4 << 20  # lines parsed per call of the CSV reader: small enough to stay in cache


def parse_chunk(buf: bytes | memoryview, max_ind_range: int = 0) -> Parsed:
    """Criteo lines (whole lines, ``\\n``-separated) -> label, dense features, category values.

    A line is rejected unless it has 40 tab-separated fields, a label of
    exactly ``0`` or ``1``, integers of up to 18 digits (optionally negative)
    or empty, and categories of exactly 8 hex digits or empty. Empty lines are
    rejected too.
    """
    buf = memoryview(buf).cast("B")
    if np.frombuffer(buf, np.uint8).max(initial=0) > 127:
        # Arrow hands a line of the wrong shape to Python as UTF-8 text, and fails on bytes that are not:
        # replace those first. Only invalid lines change (every valid field is ASCII), and their text
        # reads the same as when decoded with errors="replace".
        buf = memoryview(bytes(buf).decode("utf-8", "replace").encode())
    batches, rejected, sample, start = [], 0, [], 0
    while start < len(buf):
        end = _line_end(buf, start + PIECE_BYTES)
        batch, bad, texts = _parse_piece(buf[start:end], max_ind_range)
        batches.append(batch)
        rejected += bad
        sample += texts[: REJECT_SAMPLE - len(sample)]
        start = end
    return Parsed(pa.Table.from_batches(batches, PARSED_ARROW), rejected, sample)


def _line_end(buf: memoryview, at: int) -> int:
    """Offset just past the first ``\\n`` at or after ``at``; the end of ``buf`` when there is none."""
    while at < len(buf):
        window = np.frombuffer(buf[at : at + 4096], np.uint8)
        found = np.flatnonzero(window == 10)
        if len(found):
            return at + int(found[0]) + 1
        at += len(window)
    return len(buf)


def _parse_piece(buf: memoryview, max_ind_range: int) -> tuple[pa.RecordBatch, int, list[str]]:
    """(valid rows, number of rejected lines, text of the first few rejected) of some whole lines."""
    bad_shape: list[str] = []

    def on_bad_shape(row) -> str:
        bad_shape.append(row.text)
        return "skip"

    table = pa_csv.read_csv(
        pa.py_buffer(buf),
        read_options=pa_csv.ReadOptions(column_names=[f"f{j}" for j in range(NUM_FIELDS)], use_threads=False,
                                        block_size=len(buf) + 1),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                          ignore_empty_lines=False, invalid_row_handler=on_bad_shape),
        # binary, not string: no UTF-8 check, so one odd byte rejects its line, not the chunk
        convert_options=pa_csv.ConvertOptions(column_types={f"f{j}": pa.binary() for j in range(NUM_FIELDS)},
                                              null_values=[""], strings_can_be_null=True),
    )
    n = table.num_rows
    fields = [table.column(j).combine_chunks() for j in range(NUM_FIELDS)]
    valid = np.ones(n, dtype=bool)
    label = _label(fields[0], valid)
    dense = [_dense(f, valid) for f in fields[1 : 1 + NUM_DENSE]]
    sparse = [_hex(f, valid, max_ind_range) for f in fields[1 + NUM_DENSE :]]
    rejected, sample = len(bad_shape), bad_shape[:REJECT_SAMPLE]
    if not valid.all():
        bad = np.flatnonzero(~valid)
        rejected += len(bad)
        for i in bad[: max(0, REJECT_SAMPLE - len(sample))]:
            text = "\t".join((f[int(i)].as_py() or b"").decode("utf-8", "replace") for f in fields)
            sample.append("" if text == "\t" * (NUM_FIELDS - 1) else text)  # Arrow reads an empty line as 40 nulls
        keep = pa.array(valid)
        label = label[valid]
        dense = [d[valid] for d in dense]
        sparse = [s.filter(keep) for s in sparse]
    batch = pa.RecordBatch.from_arrays([pa.array(label), *map(pa.array, dense), *sparse], schema=PARSED_ARROW)
    return batch, rejected, sample


def _layout(field: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n + 1], data bytes) of a binary array."""
    bufs = field.buffers()
    offsets = np.frombuffer(bufs[1], np.int32)[field.offset : field.offset + len(field) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
    return offsets, data


def _rows_of(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Row of each byte position in the data buffer."""
    return np.searchsorted(offsets, positions, side="right") - 1


def _label(field: pa.Array, valid: np.ndarray) -> np.ndarray:
    offsets, data = _layout(field)
    lengths = np.diff(offsets)
    first = data[np.minimum(offsets[:-1], max(len(data) - 1, 0))] if len(data) else np.zeros(len(field), np.uint8)
    label = first.astype(np.int16) - ord("0")
    valid &= (lengths == 1) & ((label == 0) | (label == 1))
    return label.astype(np.uint8)


def _dense(field: pa.Array, valid: np.ndarray) -> np.ndarray:
    """Decimal integer -> log(1 + max(x, 0)) as float32; missing -> 0; malformed rows marked invalid."""
    n = len(field)
    offsets, data = _layout(field)
    lo, hi = int(offsets[0]), int(offsets[-1])
    segment = data[lo:hi]
    ok = np.ones(n, dtype=bool)
    bad_chars = np.flatnonzero(_NOT_DECIMAL[segment])
    if len(bad_chars):
        ok[_rows_of(offsets, bad_chars + lo)] = False
    negative = np.zeros(n, dtype=bool)
    minus = np.flatnonzero(segment == _MINUS) + lo
    if len(minus):
        rows = _rows_of(offsets, minus)
        leading = minus == offsets[rows]
        ok[rows[~leading]] = False
        negative[rows[leading]] = True
    digits = np.diff(offsets) - negative
    ok &= (digits == 0) & ~negative | (digits >= 1) & (digits <= 18)
    text = pa.Array.from_buffers(pa.string(), n, field.buffers()[:3], offset=field.offset)
    if not ok.all():
        valid &= ok
        text = pc.if_else(pa.array(ok), text, pa.scalar(None, pa.string()))
    x = pc.cast(text, pa.int64()).fill_null(0).to_numpy()
    return np.log1p(np.maximum(x, 0)).astype(np.float32)


def _hex(field: pa.Array, valid: np.ndarray, max_ind_range: int) -> pa.Array:
    """8-digit hex -> uint32 (``% max_ind_range`` when set), null where missing; malformed rows marked invalid."""
    n = len(field)
    offsets, data = _layout(field)
    lengths = np.diff(offsets)
    full = lengths == 8
    n_full = int(np.count_nonzero(full))
    if n_full == n - field.null_count:  # the usual case: every value has 8 bytes, back to back
        chars = data[offsets[0] : offsets[-1]]
    else:
        valid &= (lengths == 0) | full
        chars = data[offsets[:-1][full][:, None] + np.arange(8)].ravel()
    byte_values = np.take(_HEX_PAIRS, chars.view("<u2"))  # 2 hex digits -> one byte; 256 = not hex
    if (byte_values >> 8).any():
        valid[np.flatnonzero(full)[(byte_values.reshape(-1, 4) >> 8).any(axis=1)]] = False
    decoded = byte_values.astype(np.uint8).view(">u4").astype(np.uint32)
    if 0 < max_ind_range < 1 << 32:
        decoded %= np.uint32(max_ind_range)
    if n_full == n:
        values = decoded
    else:
        values = np.zeros(n, dtype=np.uint32)
        values[full] = decoded
    if field.offset:  # not from the CSV reader: build the null mask afresh
        return pa.array(values, mask=lengths == 0)
    # The CSV reader made empty fields null: reuse its validity bitmap.
    return pa.Array.from_buffers(pa.uint32(), n, [field.buffers()[0], pa.py_buffer(values)],
                                 null_count=field.null_count)
