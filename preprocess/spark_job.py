"""The Spark preprocessing job: Criteo TSV days -> the training-ready layout.

Spark schedules the work, sums the vocabulary counts across executors and
retries failed tasks; the per-row work runs in vectorised Python on the
executors (``mapInArrow``), where Arrow's C++ CSV parser and NumPy do in one
pass what a chain of per-column Spark expressions does slowly. Each task
reads its byte range of the day files itself, so lines never travel through
the JVM (the input paths must be readable by every executor, as for any
Spark file source).

1. **parse and count** (one Spark job over every input file): the files are
   cut into ranges of ``split_bytes`` (a line belongs to the range holding its
   first byte; a ``.gz`` file is one range, read as a stream). Each task
   parses and checks its lines, writes the typed columns of the valid rows to
   ``_scratch/parsed/<range>.arrow`` and a row account next to them, and
   yields the (column, value) counts of its training rows, hashed into
   buckets, as raw int64 bytes; Spark shuffles the buckets, and one task per
   bucket sums them and keeps the values seen at least ``freq_threshold``
   times (``_scratch/counts``). (Bytes, not rows: turning a million small
   rows into JVM rows and back cost more than the parsing.)
2. **vocabularies** (driver): ids 1, 2, ... by descending count, ties by
   ascending value; id 0 is missing, rare or unseen.
3. **map** (one Spark job): each task maps its parsed rows to ids and writes
   them straight into the final ``.npy`` files at its rows' offset, so no
   pass over the rows runs on the driver. The evaluation day's rows keep
   their line order; its first half is ``test``, the second ``val``.

The output is byte-identical whatever the engine, executors, cores or split
size: rows keep file and line order, counts are exact integers and ties are
broken by value. Category values are parsed from 8-digit hex into integers
and ids are integers throughout: nothing passes through a float.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
import zipimport
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from bench.config import NUM_DENSE, NUM_SPARSE, PreprocessConfig
from bench.fsutil import atomic_write_json
from preprocess.errors import PreprocessError
from preprocess.layout import FORMAT_VERSION, MANIFEST, SPLITS, cat_name, id_dtype

NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
DENSE = [f"i{j}" for j in range(NUM_DENSE)]
SPARSE = [f"c{j}" for j in range(NUM_SPARSE)]
REJECT_SAMPLE = 20
STEPS = 4  # progress() calls in run()
SPLIT_BYTES = 32 << 20  # input range per task; any value gives the same output
JOB_VERSION = 2  # bump when the output of the same inputs and settings changes
INPUT_ERROR = "PreprocessInputError"  # marks a worker's error about an input file

# Partial counts of one bucket of keys (key = column << 32 | value), as raw int64 bytes: a few large rows
# per task instead of one row per value, so the JVM moves bytes rather than converting rows.
COUNTS_SCHEMA = T.StructType(
    [T.StructField("bucket", T.IntegerType(), False), T.StructField("keys", T.BinaryType(), False),
     T.StructField("counts", T.BinaryType(), False)]
)
KEPT_SCHEMA = T.StructType(
    [T.StructField("bucket", T.IntegerType(), False), T.StructField("kept", T.LongType(), False)]
)
# Per mapped range: OOV values per column (column -1: rows with at least one) in test (0) or val (1).
OOV_SCHEMA = T.StructType(
    [T.StructField("split", T.ByteType(), False), T.StructField("column", T.IntegerType(), False),
     T.StructField("count", T.LongType(), False)]
)
PARSED_ARROW = pa.schema(
    [("label", pa.uint8())] + [(c, pa.float32()) for c in DENSE] + [(c, pa.uint32()) for c in SPARSE]
)

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


# ---------------------------------------------------------------------------------------------
# Parsing one chunk of lines (runs on the executors)


class Parsed:
    """One chunk of lines, parsed and checked: typed columns of the valid rows, text of the rejected.

    ``dense`` is already ``log(1 + max(x, 0))`` (missing -> 0) as float32; ``sparse`` holds the
    category values (``% max_ind_range`` when set) as uint32 Arrow arrays, null where missing.
    ``rejected`` counts every rejected line; ``sample`` keeps the text of the first few.
    """

    def __init__(self, label: np.ndarray, dense: list[np.ndarray], sparse: list[pa.Array], rejected: int,
                 sample: list[str]):
        self.label, self.dense, self.sparse, self.rejected, self.sample = label, dense, sparse, rejected, sample

    def __len__(self) -> int:
        return len(self.label)

    def batch(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays([pa.array(self.label), *map(pa.array, self.dense), *self.sparse],
                                          schema=PARSED_ARROW)


PIECE_BYTES = 4 << 20  # lines parsed per call of the CSV reader: small enough to stay in cache


def parse_chunk(buf: bytes, max_ind_range: int = 0) -> Parsed:
    """Criteo lines (whole lines, ``\\n``-separated) -> label, dense features, category values.

    A line is rejected unless it has 40 tab-separated fields, a label of
    exactly ``0`` or ``1``, integers of up to 18 digits (optionally negative)
    or empty, and categories of exactly 8 hex digits or empty. Empty lines are
    rejected too.
    """
    pieces, start = [], 0
    while start < len(buf):
        end = buf.find(b"\n", start + PIECE_BYTES) + 1 or len(buf)
        pieces.append(_parse_piece(memoryview(buf)[start:end], max_ind_range))
        start = end
    if len(pieces) == 1:
        return pieces[0]
    sample = [line for p in pieces for line in p.sample][:REJECT_SAMPLE]
    return Parsed(np.concatenate([p.label for p in pieces]),
                  [np.concatenate([p.dense[j] for p in pieces]) for j in range(NUM_DENSE)],
                  [pa.concat_arrays([p.sparse[j] for p in pieces]) for j in range(NUM_SPARSE)],
                  sum(p.rejected for p in pieces), sample)


def _parse_piece(buf: memoryview, max_ind_range: int) -> Parsed:
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
    return Parsed(label, dense, sparse, rejected, sample)


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


def value_counts(parsed: Parsed) -> tuple[np.ndarray, np.ndarray]:
    """(keys, counts) of the category values of one parsed chunk; key = column << 32 | value."""
    keys, counts = [], []
    for j, values in enumerate(parsed.sparse):
        vc = pc.value_counts(values.drop_null()) if values.null_count else pc.value_counts(values)
        keys.append(vc.field("values").to_numpy().astype(np.int64) | (j << 32))
        counts.append(vc.field("counts").to_numpy())
    return np.concatenate(keys), np.concatenate(counts)


def bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """A fixed hash of each key into 0 .. buckets - 1."""
    mixed = (keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(29)
    return (mixed % np.uint64(buckets)).astype(np.int32)


def _count_blobs(keys: np.ndarray, counts: np.ndarray, buckets: int) -> pa.RecordBatch:
    bucket = bucket_of(keys, buckets)
    order = np.argsort(bucket, kind="stable")
    keys, counts = keys[order], counts[order]
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    present = [b for b in range(buckets) if bounds[b + 1] > bounds[b]]
    return pa.RecordBatch.from_arrays(
        [pa.array(present, pa.int32()),
         pa.array([keys[bounds[b] : bounds[b + 1]].tobytes() for b in present], pa.binary()),
         pa.array([counts[bounds[b] : bounds[b + 1]].tobytes() for b in present], pa.binary())],
        schema=pa.schema([("bucket", pa.int32(), False), ("keys", pa.binary(), False),
                          ("counts", pa.binary(), False)]))


def merge_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the counts of equal keys; keys come out sorted."""
    if len(keys) == 0:
        return keys, counts
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


# ---------------------------------------------------------------------------------------------
# Input ranges


@dataclass(frozen=True)
class Split:
    """A byte range of one input file: lines whose first byte lies in [start, end).

    A ``.gz`` file is one range, decompressed as a stream and parsed ``chunk_bytes`` at a time."""

    index: int
    path: str
    start: int
    end: int
    train: bool
    chunk_bytes: int = SPLIT_BYTES

    @property
    def compressed(self) -> bool:
        return self.path.endswith(".gz")


def plan_splits(train_files: list[Path], eval_files: list[Path], split_bytes: int = SPLIT_BYTES) -> list[Split]:
    """Ranges of the input files, in file order then byte order: the order of the output rows."""
    splits: list[Split] = []
    for files, train in ((train_files, True), (eval_files, False)):
        for f in files:
            if not Path(f).is_file():
                raise PreprocessError(f"missing input file {f}")
            size = Path(f).stat().st_size
            if str(f).endswith(".gz"):
                bounds = [(0, size)]  # a gzip stream cannot be entered in the middle
            else:
                bounds = [(s, min(s + split_bytes, size)) for s in range(0, size, split_bytes)] or [(0, 0)]
            splits += [Split(len(splits) + k, str(f), s, e, train, split_bytes) for k, (s, e) in enumerate(bounds)]
    return splits


def _line_start(f, x: int, size: int) -> int:
    """Offset of the first line starting at or after ``x``."""
    if x <= 0:
        return 0
    if x >= size:
        return size
    f.seek(x - 1)
    at = x - 1
    while True:
        block = f.read(1 << 16)
        if not block:
            return size
        i = block.find(b"\n")
        if i >= 0:
            return at + i + 1
        at += len(block)


def read_chunks(split: Split) -> Iterator[bytes]:
    """The whole lines of a range, as one or more ``\\n``-separated chunks."""
    if split.compressed:
        with gzip.open(split.path, "rb") as f:
            rest = b""
            while block := f.read(split.chunk_bytes):
                block = rest + block
                cut = block.rfind(b"\n") + 1
                rest = block[cut:]
                if cut:
                    yield block[:cut]
            if rest:
                yield rest
        return
    with open(split.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        lo, hi = _line_start(f, split.start, size), _line_start(f, split.end, size)
        if hi > lo:
            f.seek(lo)
            yield f.read(hi - lo)


def _checked_chunks(split: Split) -> Iterator[bytes]:
    """``read_chunks``; a file that cannot be read raises an error the driver turns into one line."""
    try:
        yield from read_chunks(split)
    except EOFError as err:
        raise RuntimeError(f"{INPUT_ERROR}: {split.path}: truncated gzip file ({err})") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise RuntimeError(f"{INPUT_ERROR}: {split.path}: corrupt gzip file ({err})") from err
    except OSError as err:
        raise RuntimeError(f"{INPUT_ERROR}: {split.path}: cannot read it ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------------------------
# Step 1: parse every range, write its rows, count its training values (runs on the executors)


def _parsed_path(scratch: str, index: int) -> str:
    return f"{scratch}/parsed/{index:06d}.arrow"


def _lazy_zip_caches() -> None:
    """Make the worker's per-task ``importlib.invalidate_caches()`` cheap.

    Spark's Python worker calls it before every task; on Python 3.11 every
    zipimporter on the path (one per package of Spark's ``pyspark.zip``) then
    re-reads the whole zip directory: about 0.1 s of CPU per task, more than
    many tasks' work. Those zips do not change while a worker lives.
    """
    zipimport.zipimporter.invalidate_caches = _no_op


def _no_op(*args) -> None:
    return None


def _parse_task(splits: list[Split], scratch: str, max_ind_range: int, buckets: int,
                batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    _lazy_zip_caches()
    for batch in batches:
        for index in batch.column(0).to_pylist():
            yield from _parse_split(splits[index], scratch, max_ind_range, buckets)


def _parse_split(split: Split, scratch: str, max_ind_range: int, buckets: int) -> Iterator[pa.RecordBatch]:
    path = _parsed_path(scratch, split.index)
    rows = rejected = 0
    sample: list[str] = []
    # Written under a temporary name and renamed: a retried task leaves the same files.
    with pa.OSFile(path + ".tmp", "wb") as sink, pa.ipc.new_file(sink, PARSED_ARROW) as writer:
        for chunk in _checked_chunks(split):
            parsed = parse_chunk(chunk, max_ind_range)
            rows, rejected = rows + len(parsed), rejected + parsed.rejected
            sample += parsed.sample[: REJECT_SAMPLE - len(sample)]
            if len(parsed):
                writer.write_batch(parsed.batch())
                if split.train:
                    yield _count_blobs(*value_counts(parsed), buckets)
    os.replace(path + ".tmp", path)
    with open(path + ".json.tmp", "w") as f:
        json.dump({"rows": rows, "rejected": rejected, "sample": sample}, f)
    os.replace(path + ".json.tmp", path + ".json")


def _merge_task(scratch: str, threshold: int, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Sum the partial counts of the buckets in this partition; write the keys kept, per bucket."""
    _lazy_zip_caches()
    parts: dict[int, list[tuple[bytes, bytes]]] = {}
    for batch in batches:
        for bucket, keys, counts in zip(*(batch.column(j).to_pylist() for j in range(3))):
            parts.setdefault(bucket, []).append((keys, counts))
    for bucket, blobs in sorted(parts.items()):
        keys, counts = merge_counts(np.frombuffer(b"".join(k for k, _ in blobs), np.int64),
                                    np.frombuffer(b"".join(c for _, c in blobs), np.int64))
        keep = counts >= threshold
        path = f"{scratch}/counts/{bucket:06d}.npy"
        with open(path + ".tmp", "wb") as f:
            np.save(f, np.stack([keys[keep], counts[keep]], axis=1))
        os.replace(path + ".tmp", path)
        yield pa.RecordBatch.from_pydict({"bucket": [bucket], "kept": [int(keep.sum())]}, schema=_KEPT_ARROW)


_KEPT_ARROW = pa.schema([("bucket", pa.int32(), False), ("kept", pa.int64(), False)])


def count_and_parse(spark: SparkSession, splits: list[Split], scratch: Path, cfg: PreprocessConfig) -> np.ndarray:
    """Run step 1; return [n, 2] int64 (key, count) of the training values kept (key = column << 32 | value)."""
    (scratch / "parsed").mkdir(parents=True, exist_ok=True)
    (scratch / "counts").mkdir(parents=True, exist_ok=True)
    parallelism = spark.sparkContext.defaultParallelism
    train_bytes = sum(s.end - s.start for s in splits if s.train)
    # Enough buckets to spread the merge over the cores and keep each merge to ~256 MB of input text.
    buckets = 4 * max(parallelism, -(-train_bytes // (256 << 20)))
    parse = functools.partial(_parse_task, splits, str(scratch), cfg.max_ind_range, buckets)
    merge = functools.partial(_merge_task, str(scratch), max(cfg.freq_threshold, 1))
    partial_counts = spark.range(0, len(splits), 1, len(splits)).mapInArrow(parse, COUNTS_SCHEMA)
    kept = partial_counts.repartition(max(1, buckets // 4), "bucket").mapInArrow(merge, KEPT_SCHEMA)
    rows = _spark_action(kept.collect)
    tables = [np.load(scratch / "counts" / f"{r['bucket']:06d}.npy") for r in sorted(rows, key=lambda r: r["bucket"])]
    return np.concatenate(tables) if tables else np.empty((0, 2), np.int64)


def _spark_action(action: Callable[[], object]) -> object:
    """Run a Spark action; an executor's error about an input file becomes one PreprocessError line."""
    try:
        return action()
    except Exception as err:  # noqa: BLE001 - Py4JJavaError, PythonException, ...: all carry the worker's text
        match = re.search(rf"{INPUT_ERROR}: ([^\n]*)", str(err))
        if match:
            raise PreprocessError(match.group(1).strip()) from None
        raise


# ---------------------------------------------------------------------------------------------
# Step 2: vocabularies (driver)


def save_vocabularies(counts: np.ndarray, out_dir: Path) -> list[int]:
    """Write each column's values in id order as ``vocab/cat_XX.npy``; return vocabulary sizes (with id 0).

    ``counts``: [n, 2] int64 (key, count) of the values kept, key = column << 32 | value."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key, count = counts[:, 0], counts[:, 1]
    column, value = key >> 32, key & 0xFFFFFFFF
    # Hot values get small ids, so the rows touched most sit together in the table.
    order = np.lexsort((value, -count, column))
    column, value = column[order], value[order]
    bounds = np.searchsorted(column, np.arange(NUM_SPARSE + 1))
    sizes = []
    for j in range(NUM_SPARSE):
        values = np.ascontiguousarray(value[bounds[j] : bounds[j + 1]], dtype=np.int64)
        np.save(out_dir / f"{cat_name(j)}.npy", values)
        sizes.append(len(values) + 1)
    return sizes


# ---------------------------------------------------------------------------------------------
# Step 3: map to ids and write the final arrays (runs on the executors)


@dataclass(frozen=True)
class Target:
    """Where the valid rows of range ``index`` go: rows ``[at, at + rows)`` of the training split
    (``train``) or of the evaluation day, whose first ``test_rows`` rows are ``test``, the rest ``val``."""

    index: int
    train: bool
    at: int
    rows: int


def _create_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """An .npy file of the given shape, zero-filled (sparse); returns the byte offset of its data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        offset = f.tell()
        f.truncate(offset + dtype.itemsize * math.prod(shape))
    return offset


def create_split(folder: Path, rows: int, vocab_sizes: list[int]) -> dict[str, tuple[str, int]]:
    """The empty ``.npy`` files of one split: name -> (path, byte offset of row 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"label": (np.dtype(np.uint8), (rows,)), "dense": (np.dtype(np.float32), (rows, NUM_DENSE))}
    for j in range(NUM_SPARSE):
        files[cat_name(j)] = (id_dtype(vocab_sizes[j]), (rows,))
    return {name: (str(folder / f"{name}.npy"), _create_npy(folder / f"{name}.npy", dtype, shape))
            for name, (dtype, shape) in files.items()}


def _pwrite(file: tuple[str, int], row: int, array: np.ndarray) -> None:
    """Write ``array`` (rows of the file's dtype and row shape) at row ``row`` of an .npy file."""
    path, data_offset = file
    array = np.ascontiguousarray(array)
    view = memoryview(array).cast("B")
    offset = data_offset + row * (array.nbytes // max(len(array), 1))
    fd = os.open(path, os.O_WRONLY)
    try:
        while len(view):
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=2)
def _vocab_sets(vocab_dir: str, run_id: str) -> list[pa.Array]:
    """Per column: the vocabulary in id order, as the value set of ``index_in``.

    Cached per reused worker and per run (a later run may write other vocabularies to the same folder)."""
    return [pa.array(np.load(f"{vocab_dir}/{cat_name(j)}.npy").astype(np.uint32)) for j in range(NUM_SPARSE)]


def _map_task(targets: list[Target], scratch: str, vocab_dir: str, run_id: str,
              outputs: dict[str, dict[str, tuple[str, int]]], id_dtypes: list[str], test_rows: int,
              batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    _lazy_zip_caches()
    vocab = _vocab_sets(vocab_dir, run_id)
    for batch in batches:
        for k in batch.column(0).to_pylist():
            yield from _map_range(targets[k], scratch, vocab, outputs, id_dtypes, test_rows)


def _map_range(target: Target, scratch: str, vocab: list[pa.Array], outputs: dict[str, dict[str, tuple[str, int]]],
               id_dtypes: list[str], test_rows: int) -> Iterator[pa.RecordBatch]:
    at = target.at  # row of the next batch in the training split or the evaluation day
    with pa.OSFile(_parsed_path(scratch, target.index), "rb") as source:
        reader = pa.ipc.open_file(source)
        for b in range(reader.num_record_batches):  # one batch per parsed chunk: memory stays bounded
            batch = reader.get_batch(b)
            yield from _map_batch(batch, at, target.train, vocab, outputs, id_dtypes, test_rows)
            at += batch.num_rows
    assert at == target.at + target.rows, (target, at)


def _map_batch(batch: pa.RecordBatch, at: int, train: bool, vocab: list[pa.Array],
               outputs: dict[str, dict[str, tuple[str, int]]], id_dtypes: list[str],
               test_rows: int) -> Iterator[pa.RecordBatch]:
    n = batch.num_rows
    label = batch.column("label").to_numpy()
    dense = np.column_stack([batch.column(c).to_numpy() for c in DENSE])
    ids, oov = [], []
    for j, c in enumerate(SPARSE):
        values = batch.column(c)
        found = pc.index_in(values, value_set=vocab[j]).fill_null(-1).to_numpy()
        ids.append((found + 1).astype(id_dtypes[j]))
        if not train:  # present, but rare or unseen in training
            oov.append((found < 0) & values.is_valid().to_numpy(zero_copy_only=False))
    # (split, its row for row lo of this batch, rows [lo, hi) of this batch)
    if train:
        pieces = [("train", at, 0, n)]
    else:
        cut = min(max(test_rows - at, 0), n)
        pieces = [("test", at, 0, cut), ("val", at + cut - test_rows, cut, n)]
    for split, row, lo, hi in pieces:
        if hi <= lo:
            continue
        files = outputs[split]
        _pwrite(files["label"], row, label[lo:hi])
        _pwrite(files["dense"], row, dense[lo:hi])
        for j in range(NUM_SPARSE):
            _pwrite(files[cat_name(j)], row, ids[j][lo:hi])
        if oov:
            per_column = [int(np.count_nonzero(o[lo:hi])) for o in oov]
            any_row = int(np.count_nonzero(np.logical_or.reduce([o[lo:hi] for o in oov])))
            yield pa.RecordBatch.from_pydict(
                {"split": np.full(NUM_SPARSE + 1, SPLITS.index(split) - 1, np.int8),
                 "column": np.arange(-1, NUM_SPARSE, dtype=np.int32),
                 "count": np.array([any_row, *per_column], np.int64)})


def map_and_write(spark: SparkSession, targets: list[Target], scratch: Path, vocab_dir: Path,
                  outputs: dict[str, dict[str, tuple[str, int]]], vocab_sizes: list[int], test_rows: int) -> dict:
    """Run step 3; return the OOV account of the evaluation day."""
    task = functools.partial(_map_task, targets, str(scratch), str(vocab_dir), uuid.uuid4().hex, outputs,
                             [str(id_dtype(v)) for v in vocab_sizes], test_rows)
    rows = _spark_action(lambda: spark.range(0, len(targets), 1, max(len(targets), 1))
                         .mapInArrow(task, OOV_SCHEMA).collect()) if targets else []
    oov = {"test": np.zeros(NUM_SPARSE + 1, np.int64), "val": np.zeros(NUM_SPARSE + 1, np.int64)}
    for r in rows:
        oov[("test", "val")[r["split"]]][r["column"] + 1] += r["count"]
    return {"oov_rows": {s: int(v[0]) for s, v in oov.items()},
            "oov_per_column": {s: [int(x) for x in v[1:]] for s, v in oov.items()}}


# ---------------------------------------------------------------------------------------------
# The whole job (driver)


def file_digests(root: Path) -> dict[str, dict]:
    """sha256, shape and dtype of every .npy file under ``root``, by relative path."""
    paths = sorted(p for p in root.rglob("*.npy") if "_scratch" not in p.parts)

    def digest(path: Path) -> tuple[str, dict]:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        array = np.load(path, mmap_mode="r")
        return path.relative_to(root).as_posix(), {"sha256": h.hexdigest(), "shape": list(array.shape),
                                                   "dtype": str(array.dtype)}

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        return dict(pool.map(digest, paths))


def _summaries(scratch: Path, splits: list[Split]) -> list[dict]:
    out = []
    for s in splits:
        path = Path(_parsed_path(str(scratch), s.index) + ".json")
        if not path.is_file():
            raise PreprocessError(f"the parse task of {s.path} bytes {s.start}..{s.end} left no account ({path})")
        out.append(json.loads(path.read_text()))
    return out


def run(
    spark: SparkSession,
    cfg: PreprocessConfig,
    train_files: list[Path],
    eval_files: list[Path],
    out_root: Path,
    progress: Callable[[str], None] = lambda step: None,
    split_bytes: int = SPLIT_BYTES,
) -> dict:
    """Run the whole job; write ``out_root`` (via a temporary folder) and return its manifest."""
    tmp = out_root.with_name(out_root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = tmp / "_scratch"
    scratch.mkdir(parents=True)
    try:
        manifest = _run(spark, cfg, train_files, eval_files, tmp, scratch, progress, split_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_root, ignore_errors=True)
    tmp.rename(out_root)
    return manifest


def _run(spark: SparkSession, cfg: PreprocessConfig, train_files: list[Path], eval_files: list[Path], tmp: Path,
         scratch: Path, progress: Callable[[str], None], split_bytes: int) -> dict:
    steps: dict[str, float] = {}
    with PeakRss() as peak:
        clock = time.perf_counter()
        progress("parse lines and count training values")
        splits = plan_splits(train_files, eval_files, split_bytes)
        counts = count_and_parse(spark, splits, scratch, cfg)
        summaries = _summaries(scratch, splits)
        steps["parse_and_count"] = round(time.perf_counter() - clock, 3)

        clock = time.perf_counter()
        progress("build vocabularies")
        vocab_sizes = save_vocabularies(counts, tmp / "vocab")
        targets, at = [], {True: 0, False: 0}
        for s, summary in zip(splits, summaries):
            if summary["rows"]:
                targets.append(Target(s.index, s.train, at[s.train], summary["rows"]))
            at[s.train] += summary["rows"]
        train_rows, eval_rows = at[True], at[False]
        rejected = {k: sum(m["rejected"] for s, m in zip(splits, summaries) if s.train == t)
                    for k, t in (("train", True), ("eval", False))}
        sample = [line for m in summaries for line in m["sample"]][:REJECT_SAMPLE]
        if train_rows == 0:
            raise PreprocessError(
                f"no valid rows in the training days ({rejected['train']} read, all rejected; first: {sample[:1]}); "
                "check that the files are Criteo TSV with 40 tab-separated fields"
            )
        test_rows = eval_rows // 2
        rows = {"train": train_rows, "test": test_rows, "val": eval_rows - test_rows}
        outputs = {split: create_split(tmp / split, n, vocab_sizes) for split, n in rows.items()}
        steps["vocabularies"] = round(time.perf_counter() - clock, 3)

        clock = time.perf_counter()
        progress("map ids and write arrays")
        oov = map_and_write(spark, targets, scratch, tmp / "vocab", outputs, vocab_sizes, test_rows)
        steps["map_and_write"] = round(time.perf_counter() - clock, 3)

        clock = time.perf_counter()
        progress("checksums")
        shutil.rmtree(scratch)
        files = file_digests(tmp)
        steps["checksums"] = round(time.perf_counter() - clock, 3)

    manifest = {
        "format_version": FORMAT_VERSION,
        "job_version": JOB_VERSION,
        "rows": rows,
        "rows_read": {"train": train_rows + rejected["train"], "eval": eval_rows + rejected["eval"]},
        "rows_rejected": rejected,
        "rejected_sample": sample,
        "vocab_sizes": vocab_sizes,
        "id_dtypes": [str(id_dtype(v)) for v in vocab_sizes],
        "dense_transform": "log(1 + max(x, 0)), missing -> 0, applied in preprocessing",
        "freq_threshold": cfg.freq_threshold,
        "max_ind_range": cfg.max_ind_range,
        **oov,
        "inputs": {"train": [f.name for f in train_files], "eval": [f.name for f in eval_files]},
        "files": files,
        "timing": {"steps_seconds": steps, "input_ranges": len(splits), "peak_rss_bytes": peak.result()},
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def rows_per_s(manifest: dict, seconds: float) -> float:
    read = sum(manifest["rows_read"].values())
    return read / seconds if seconds > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# Measurements


def warm_up(spark: SparkSession, cfg: PreprocessConfig, folder: Path) -> float:
    """Run the whole job once on a few generated lines in ``folder`` (then deleted); return its seconds.

    The first job of a session starts Spark's Python workers and has the JVM load and compile its
    code paths: several seconds that do not depend on the data. Run this before a timed job so the
    job's rows/s measures throughput, and report the warm-up as start-up.
    """
    start = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lines = ["\t".join([str(i % 2), *(str(i * j % 97) for j in range(NUM_DENSE)),
                             *(f"{(i % 7 + j) * 2654435761 % (1 << 32):08x}" for j in range(NUM_SPARSE))]) + "\n"
                 for i in range(256)]
        (folder / "train").write_text("".join(lines))
        (folder / "eval").write_text("".join(lines[:64]))
        run(spark, cfg, [folder / "train"], [folder / "eval"], folder / "out")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return time.perf_counter() - start


def parse_floor_rows_per_s(files: list[Path], max_bytes: int | None = 1 << 30) -> float:
    """Rows/s of Arrow's multi-threaded CSV reader alone on these files: the raw parse floor.

    All 40 columns as strings, tab-separated, no quoting, ``use_threads=True``; only the parse is
    timed (the bytes are read first). With ``max_bytes``, an equal share from the start of each
    file is parsed (whole lines), so a 1 TB dataset is sampled, not read.
    """
    share = None if max_bytes is None else max(1, max_bytes // max(len(files), 1))
    rows, seconds = 0, 0.0
    options = dict(
        read_options=pa_csv.ReadOptions(column_names=[f"f{j}" for j in range(NUM_FIELDS)], use_threads=True),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                          invalid_row_handler=lambda row: "skip"),
        convert_options=pa_csv.ConvertOptions(column_types={f"f{j}": pa.string() for j in range(NUM_FIELDS)}),
    )
    for path in files:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as f:
            buf = f.read() if share is None else f.read(share)
        if share is not None and len(buf) == share:
            buf = buf[: buf.rfind(b"\n") + 1]
        start = time.perf_counter()
        table = pa_csv.read_csv(pa.py_buffer(buf), **options)
        seconds += time.perf_counter() - start
        rows += table.num_rows
        del table, buf
    return rows / seconds if seconds > 0 else math.nan


class PeakRss:
    """Peak resident memory during a block: of the driver (this process and the Spark driver JVM)
    and of the executors (Spark's Python workers and, with RayDP, the executor JVMs), polled in a
    thread over this process's descendants. Sums of RSS (shared pages counted once per process)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = {"driver": 0, "executors": 0}
        self._stop = threading.Event()
        self._kinds: dict[int, str | None] = {}
        self._thread = threading.Thread(target=self._poll, name="peak-rss", daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, int]:
        return dict(self.peak)

    @staticmethod
    def _kind(proc) -> str | None:
        try:
            cmd = " ".join(proc.cmdline())
        except Exception:  # noqa: BLE001 - gone or not ours
            return None
        if "org.apache.spark.deploy.SparkSubmit" in cmd:
            return "driver"
        if "pyspark.daemon" in cmd or "pyspark.worker" in cmd or "RayDPExecutor" in cmd:
            return "executors"
        if "io.ray.runtime.runner.worker.DefaultWorker" in cmd:  # RayDP's executors are Ray Java actors
            return "executors"
        return None

    def _poll(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        procs: list = []
        tick = 0
        while True:
            if tick % 5 == 0:  # re-list the process tree every few polls; RSS every poll
                try:
                    procs = [(p, self._kinds.setdefault(p.pid, self._kind(p))) for p in me.children(recursive=True)]
                except Exception:  # noqa: BLE001
                    pass
            tick += 1
            total = {"driver": 0, "executors": 0}
            try:
                total["driver"] += me.memory_info().rss
            except Exception:  # noqa: BLE001
                pass
            for p, kind in procs:
                if kind:
                    try:
                        total[kind] += p.memory_info().rss
                    except Exception:  # noqa: BLE001 - exited
                        pass
            for k, v in total.items():
                self.peak[k] = max(self.peak[k], v)
            if self._stop.wait(self.interval):
                return
