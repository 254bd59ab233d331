"""Vocabularies: counting category values, merging the counts, ranking them, and the id of each value.

A value is counted under the key ``column << 32 | value``. Each parse task
counts the values of its training rows and hands the counts on hashed into
buckets (Spark shuffles them, spilling as needed); one merge task per bucket
sums them exactly, keeps the values seen at least ``freq_threshold`` times and
writes them to a bucket file, sorted by key. The driver then ranks one column
at a time (so it holds the largest column, never all of them): ids 1, 2, ...
by descending count, ties by ascending value (id 0 is missing, rare or
unseen), so the ids do not depend on how the work was cut.

Next to each vocabulary the driver writes a lookup table that the map tasks
memory-map: nothing is built per task or per worker, and the workers of a node
share one copy in the page cache. With ``max_ind_range`` the values are below
it and the table is direct (the id of value ``v`` at row ``v``, in the column's
id dtype); without, it is an open-addressing hash table (linear probing, at
most half full) of ``value << 32 | id`` entries, 0 for an empty slot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.config import NUM_SPARSE
from preprocess.arrays import create_npy
from preprocess.layout import cat_name, id_dtype
from preprocess.parse import SPARSE, Parsed

COUNT_BLOBS_ARROW = pa.schema([("bucket", pa.int32(), False), ("keys", pa.binary(), False),
                               ("counts", pa.binary(), False)])
DIRECT_MAX = 1 << 28  # largest max_ind_range with direct tables (a uint32 table of it: 1 GiB per column)
_HASH_MIN_BITS = 12  # a small table stays cache-resident, and its hot values at their first slot
_GOLDEN = np.uint32(0x9E3779B1)  # Fibonacci hashing: spreads sequential values over the slots


def value_counts(parsed: Parsed) -> tuple[np.ndarray, np.ndarray]:
    """(keys, counts) of the category values of one parsed chunk; key = column << 32 | value."""
    keys, counts = [], []
    for j, name in enumerate(SPARSE):
        values = parsed.table.column(name)
        vc = pc.value_counts(values.drop_null()) if values.null_count else pc.value_counts(values)
        keys.append(vc.field("values").to_numpy().astype(np.int64) | (j << 32))
        counts.append(vc.field("counts").to_numpy())
    return np.concatenate(keys), np.concatenate(counts)


def bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """A fixed hash of each key into 0 .. buckets - 1."""
    mixed = (keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(29)
    return (mixed % np.uint64(buckets)).astype(np.int32)


def count_blobs(keys: np.ndarray, counts: np.ndarray, buckets: int) -> pa.RecordBatch:
    """Partial counts as one row per bucket of raw int64 bytes: the JVM moves a few large rows, not a
    row per value (turning a million small rows into JVM rows and back cost more than the parsing)."""
    bucket = bucket_of(keys, buckets)
    # 16-bit buckets sort by radix: several times faster than a comparison sort of a million keys
    order = np.argsort(bucket.astype(np.uint16) if buckets <= 1 << 16 else bucket, kind="stable")
    keys, counts = keys[order], counts[order]
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    present = np.flatnonzero(bounds[1:] > bounds[:-1])
    # The buckets' bytes lie back to back: each column is one buffer and its offsets, no per-bucket copy.
    offsets = pa.py_buffer(np.append(bounds[present], bounds[-1]).astype(np.int32) * 8)
    blobs = [pa.Array.from_buffers(pa.binary(), len(present), [None, offsets, pa.py_buffer(a)]) for a in (keys, counts)]
    return pa.RecordBatch.from_arrays([pa.array(present, pa.int32()), *blobs], schema=COUNT_BLOBS_ARROW)


def merge_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the counts of equal keys; keys come out sorted."""
    if len(keys) == 0:
        return keys, counts
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


@dataclass(frozen=True)
class KeptSlice:
    """Rows ``[start, stop)`` of a bucket file: the kept (key, count) pairs of one column."""

    path: str
    start: int
    stop: int


def save_kept(path: str, keys: np.ndarray, counts: np.ndarray) -> list[tuple[int, KeptSlice]]:
    """Write sorted keys and their counts as raw int64 (key, count) pairs; return (column, slice) of each
    column present. Written under a temporary name and renamed: a retried task leaves the same file."""
    with open(path + ".tmp", "wb") as f:
        np.stack([keys, counts], axis=1).astype(np.int64, copy=False).tofile(f)
    os.replace(path + ".tmp", path)
    bounds = np.searchsorted(keys >> 32, np.arange(NUM_SPARSE + 1))
    return [(j, KeptSlice(path, int(bounds[j]), int(bounds[j + 1]))) for j in range(NUM_SPARSE)
            if bounds[j + 1] > bounds[j]]


def read_kept(slices: list[KeptSlice]) -> np.ndarray:
    """[n, 2] int64 (key, count): the slices one after the other."""
    pairs = np.empty((sum(s.stop - s.start for s in slices), 2), np.int64)
    at = 0
    for s in slices:
        rows = s.stop - s.start
        pairs[at : at + rows] = np.fromfile(s.path, np.int64, 2 * rows, offset=16 * s.start).reshape(rows, 2)
        at += rows
    return pairs


def rank_values(pairs: np.ndarray) -> np.ndarray:
    """The values of one column's (key, count) pairs in id order: descending count, ties by ascending value."""
    value = pairs[:, 0] & 0xFFFFFFFF
    if len(value) == 0:
        return value
    count = pairs[:, 1]
    value_bits, top = int(value.max()).bit_length(), int(count.max())
    if value_bits + top.bit_length() > 63:  # a count >= 2^31 beside 32-bit values: two sort keys
        return value[np.lexsort((value, -count))]
    # One sort of (top - count) above the value: 5x faster than lexsort's two stable sorts.
    packed = (top - count) << value_bits
    packed |= value
    packed.sort()
    packed &= (1 << value_bits) - 1
    return packed


def direct_lookup(max_ind_range: int) -> bool:
    """Whether the lookup tables are direct (values bounded by max_ind_range) or hashed."""
    return 0 < max_ind_range <= DIRECT_MAX


def hash_table(values: np.ndarray) -> np.ndarray:
    """Open-addressing table of ``value << 32 | id`` (ids 1, 2, ... in the order of ``values``, distinct
    uint32), 0 for empty, linear probing. Lower ids are placed first, so the hot values sit at their home slot."""
    bits = max(_HASH_MIN_BITS, (2 * len(values) - 1).bit_length())
    table = np.zeros(1 << bits, np.uint64)
    entry = (values.astype(np.uint64) << np.uint64(32)) | np.arange(1, len(values) + 1, dtype=np.uint64)
    slot = _home_slots(values.astype(np.uint32), bits).astype(np.int64)
    pending = np.arange(len(values))
    while len(pending):
        s = slot[pending]
        free = table[s] == 0
        # Per free slot the lowest id claiming it wins; the rest, and those at taken slots, probe on.
        claimed, first = np.unique(s[free], return_index=True)
        winners = pending[free][first]
        table[claimed] = entry[winners]
        placed = np.zeros(len(values), bool)
        placed[winners] = True
        pending = pending[~placed[pending]]
        slot[pending] = (slot[pending] + 1) & ((1 << bits) - 1)
    return table


def _home_slots(values: np.ndarray, bits: int) -> np.ndarray:
    slot = values * _GOLDEN
    slot >>= np.uint32(32 - bits)
    return slot


def hashed_ids(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """uint32 id of each uint32 value in a ``hash_table``, 0 where absent."""
    bits = len(table).bit_length() - 1
    slot = _home_slots(values, bits)
    entry = np.take(table, slot)
    found = (entry >> np.uint64(32)).astype(np.uint32) == values
    ids = entry.astype(np.uint32)  # the low 32 bits
    ids *= found  # (a multiply is several times faster than a masked store)
    todo = np.flatnonzero((entry != 0) & ~found)  # another value holds the slot: probe on
    while len(todo):
        slot[todo] = s = (slot[todo] + np.uint32(1)) & np.uint32((1 << bits) - 1)
        entry = np.take(table, s)
        hit = (entry >> np.uint64(32)).astype(np.uint32) == values[todo]
        ids[todo[hit]] = entry[hit].astype(np.uint32)
        todo = todo[~hit & (entry != 0)]
    return ids


def lookup_path(lookup_dir: str | Path, column: int) -> str:
    return f"{lookup_dir}/{cat_name(column)}.npy"


def save_vocabularies(columns: list[list[KeptSlice]], out_dir: Path, lookup_dir: Path,
                      max_ind_range: int) -> list[int]:
    """Write each column's values in id order as ``vocab/cat_XX.npy`` and its lookup table in ``lookup_dir``;
    return vocabulary sizes (with id 0). ``columns``: per column, where its kept (key, count) pairs are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lookup_dir.mkdir(parents=True, exist_ok=True)
    sizes = []
    for j, slices in enumerate(columns):
        values = rank_values(read_kept(slices))  # hot values get small ids: the rows touched most sit together
        np.save(out_dir / f"{cat_name(j)}.npy", values)
        write_lookup(values, lookup_path(lookup_dir, j), max_ind_range)
        sizes.append(len(values) + 1)
    return sizes


def write_lookup(values: np.ndarray, path: str, max_ind_range: int) -> None:
    """The lookup table of a vocabulary (its values in id order) as an ``.npy`` file."""
    if direct_lookup(max_ind_range):
        create_npy(Path(path), id_dtype(len(values) + 1), (max_ind_range,))  # sparse: only pages with ids take space
        table = np.load(path, mmap_mode="r+")
        table[values] = np.arange(1, len(values) + 1, dtype=table.dtype)
        table.flush()
        del table
    else:
        np.save(path, hash_table(values))


def load_lookups(lookup_dir: str) -> list[np.ndarray]:
    """Each column's lookup table, memory-mapped: opening them costs a few file opens, nothing is built."""
    return [np.asarray(np.load(lookup_path(lookup_dir, j), mmap_mode="r")) for j in range(NUM_SPARSE)]


def lookup_ids(table: np.ndarray, values: pa.ChunkedArray, direct: bool,
               dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """(id of each value in ``dtype``, 0 where missing or not in the vocabulary; validity mask, None without nulls)."""
    column = values.combine_chunks()
    n, at = len(column), column.offset
    # Straight from Arrow's buffers: a tenth of the time of fill_null / is_valid and their conversions.
    # The slots of missing values hold arbitrary numbers: looked up like the rest, then zeroed.
    raw = np.frombuffer(column.buffers()[1], np.uint32, n, 4 * at) if n else np.empty(0, np.uint32)
    if direct:  # values are below max_ind_range, the table's length (clip only skips the bounds check)
        ids = np.take(table, raw, mode="clip")
    else:
        ids = hashed_ids(table, raw).astype(dtype, copy=False)
    if not column.null_count:
        return ids, None
    valid = np.unpackbits(np.frombuffer(column.buffers()[0], np.uint8), count=at + n, bitorder="little")[at:]
    ids *= valid
    return ids, valid.view(bool)
