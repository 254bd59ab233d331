"""Vocabularies: counting category values, merging the counts, and the id of each value.

A value is counted under the key ``column << 32 | value``. Each parse task
counts the values of its training rows and hands the counts on hashed into
buckets (Spark shuffles them, spilling as needed); one merge task per bucket
sums them exactly and keeps the values seen at least ``freq_threshold`` times. The driver then numbers each column's
kept values 1, 2, ... by descending count, ties by ascending value (id 0 is
missing, rare or unseen), so the ids do not depend on how the work was cut.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.config import NUM_SPARSE
from preprocess.layout import cat_name
from preprocess.parse import SPARSE, Parsed

COUNT_BLOBS_ARROW = pa.schema([("bucket", pa.int32(), False), ("keys", pa.binary(), False),
                               ("counts", pa.binary(), False)])


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
    order = np.argsort(bucket, kind="stable")
    keys, counts = keys[order], counts[order]
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    present = [b for b in range(buckets) if bounds[b + 1] > bounds[b]]
    return pa.RecordBatch.from_arrays(
        [pa.array(present, pa.int32()),
         pa.array([keys[bounds[b] : bounds[b + 1]].tobytes() for b in present], pa.binary()),
         pa.array([counts[bounds[b] : bounds[b + 1]].tobytes() for b in present], pa.binary())],
        schema=COUNT_BLOBS_ARROW)


def merge_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the counts of equal keys; keys come out sorted."""
    if len(keys) == 0:
        return keys, counts
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


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


@functools.lru_cache(maxsize=2)
def vocab_sets(vocab_dir: str, run_id: str) -> list[pa.Array]:
    """Per column: the vocabulary in id order, as the value set of ``index_in``.

    Cached per reused worker and per run (a later run may write other vocabularies to the same folder)."""
    return [pa.array(np.load(f"{vocab_dir}/{cat_name(j)}.npy").astype(np.uint32)) for j in range(NUM_SPARSE)]
