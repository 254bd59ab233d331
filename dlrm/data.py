"""Batches for one rank, read straight from the memory-mapped training-ready layout.

Which rows a rank reads is plain arithmetic (no sampler, no shuffling), so every
rank knows its rows without talking to the others:

  training    step i of the global batch B: rank r of W reads
              rows [i*B + r*B/W, i*B + (r+1)*B/W); the last incomplete global batch is dropped.
  evaluation  the split is cut into W contiguous shards; rank r reads shard r in batches.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch

from bench.config import NUM_SPARSE
from preprocess.layout import ProcessedData

Range = tuple[int, int]


class Batch(NamedTuple):
    dense: torch.Tensor  # float32 [b, 13]
    ids: torch.Tensor  # int64 [b, 26]; column c is contiguous (what table c reads)
    labels: torch.Tensor  # float32 [b]


def local_batch_size(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} does not split evenly across {world_size} ranks")
    return global_batch // world_size


def steps_per_epoch(rows: int, global_batch: int) -> int:
    return rows // global_batch  # the last incomplete global batch is dropped


def train_range(step: int, global_batch: int, rank: int, world_size: int) -> Range:
    """Rows rank ``rank`` reads at ``step`` (within an epoch)."""
    local = local_batch_size(global_batch, world_size)
    start = step * global_batch + rank * local
    return start, start + local


def shard_range(rows: int, rank: int, world_size: int) -> Range:
    """Rank ``rank``'s contiguous shard; shard sizes differ by at most one row."""
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def batch_ranges(shard: Range, batch_size: int) -> list[Range]:
    """A shard cut into batches; the last one may be short."""
    start, stop = shard
    return [(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]


def read_batch(data: ProcessedData, rows: Range) -> Batch:
    start, stop = rows
    # The ids are assembled as [26, b] so each table's ids are one contiguous row; the
    # transposed view is the [b, 26] batch. Each memmap slice is widened in one copy
    # (row assignment into the preallocated array: ~2x faster than np.stack(out=)).
    ids = np.empty((NUM_SPARSE, stop - start), dtype=np.int64)
    for c, col in enumerate(data.cats):
        ids[c] = col[start:stop]
    dense = np.array(data.dense[start:stop], dtype=np.float32)
    labels = data.label[start:stop].astype(np.float32)
    return Batch(torch.from_numpy(dense), torch.from_numpy(ids).T, torch.from_numpy(labels))


def train_batches(data: ProcessedData, global_batch: int, rank: int, world_size: int,
                  epochs: int = 1, start: int = 0) -> Iterator[Batch]:
    """This rank's part of every global batch, epoch after epoch, in file order.

    ``start``: the number of steps already taken (a resumed run continues there).
    """
    steps = steps_per_epoch(len(data), global_batch)
    for step in range(start, steps * epochs):
        yield read_batch(data, train_range(step % steps, global_batch, rank, world_size))


def eval_batches(data: ProcessedData, batch_size: int, rank: int, world_size: int,
                 rows: int | None = None) -> Iterator[Batch]:
    """This rank's shard of the split (or of its first ``rows`` rows), in batches;
    every row evaluated is read by exactly one rank."""
    total = len(data) if rows is None else min(rows, len(data))
    for batch in batch_ranges(shard_range(total, rank, world_size), batch_size):
        yield read_batch(data, batch)
