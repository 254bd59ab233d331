"""The output ``.npy`` files: created at their final size, filled in place by the tasks, checksummed."""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.config import NUM_DENSE, NUM_SPARSE
from preprocess.layout import cat_name, id_dtype

NpyFile = tuple[str, int]  # path, byte offset of row 0


def create_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """An .npy file of the given shape, zero-filled (sparse); returns the byte offset of its data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        offset = f.tell()
        f.truncate(offset + dtype.itemsize * math.prod(shape))
    return offset


def create_split(folder: Path, rows: int, vocab_sizes: list[int]) -> dict[str, NpyFile]:
    """The empty ``.npy`` files of one split, by name (``label``, ``dense``, ``cat_XX``)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"label": (np.dtype(np.uint8), (rows,)), "dense": (np.dtype(np.float32), (rows, NUM_DENSE))}
    for j in range(NUM_SPARSE):
        files[cat_name(j)] = (id_dtype(vocab_sizes[j]), (rows,))
    return {name: (str(folder / f"{name}.npy"), create_npy(folder / f"{name}.npy", dtype, shape))
            for name, (dtype, shape) in files.items()}


def pwrite(file: NpyFile, row: int, array: np.ndarray) -> None:
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
