"""The on-disk formats that flow between stages: raw day files, and the training-ready layout.

Raw data (``<DATA_DIR>/raw/<dataset id>/``)
    ``day_<N>`` files in Criteo's click-log format: one row per line, 40
    tab-separated fields: label (0/1), 13 integer features (may be empty or
    negative), 26 categorical features as 8-digit lowercase hex (may be empty).
    ``dataset.json`` describes them (source, which days train and which
    evaluate, rows per day, and for synthetic data the oracle AUC).

Training-ready data (``<DATA_DIR>/processed/<key>/``), written by the Spark job
    ``manifest.json``          shapes, dtypes, row accounting, vocabulary sizes
    ``<split>/label.npy``      uint8   [rows]        click (1) or not (0)
    ``<split>/dense.npy``      float32 [rows, 13]    log(1 + max(x, 0)); missing -> 0
    ``<split>/cat_<c>.npy``    uint    [rows]        per column c in 00..25: contiguous id,
                                                     0 = missing, unseen or rare value;
                                                     ids 1.. ordered by descending
                                                     training frequency
    ``vocab/cat_<c>.npy``      int64   [vocab-1]     parsed hex value of id 1, 2, ...
    splits: ``train`` (the training days), ``test`` (first half of the
    evaluation day), ``val`` (second half).

Every ``.npy`` is a plain NumPy array file, so the loader memory-maps it and
reads batches without parsing. Category ids are stored in the narrowest
unsigned integer type that holds the column's vocabulary and never pass
through a float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.config import NUM_DENSE, NUM_SPARSE
from bench.fsutil import read_json

SPLITS = ("train", "test", "val")
MANIFEST = "manifest.json"
DATASET_MANIFEST = "dataset.json"
FORMAT_VERSION = 1


def day_file(raw_dir: Path, day: int) -> Path:
    return Path(raw_dir) / f"day_{day}"


def cat_name(column: int) -> str:
    return f"cat_{column:02d}"


def id_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned type that holds ids 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


class ProcessedData:
    """Read side of the training-ready layout: memory-mapped arrays of one split."""

    def __init__(self, root: Path, split: str):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.root = Path(root)
        self.manifest = read_json(self.root / MANIFEST)
        folder = self.root / split
        self.label = np.load(folder / "label.npy", mmap_mode="r")
        self.dense = np.load(folder / "dense.npy", mmap_mode="r")
        self.cats = [np.load(folder / f"{cat_name(c)}.npy", mmap_mode="r") for c in range(NUM_SPARSE)]
        assert self.dense.shape == (len(self.label), NUM_DENSE)

    def __len__(self) -> int:
        return len(self.label)

    @property
    def vocab_sizes(self) -> list[int]:
        return list(self.manifest["vocab_sizes"])
