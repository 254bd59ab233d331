"""Byte ranges of the input day files: the unit of work of the Spark job.

A file is cut into ranges of ``range_bytes``; a line belongs to the range
holding its first byte, so every line is read exactly once whatever the
range size. A ``.gz`` file is one range (a gzip stream cannot be entered in
the middle), decompressed as a stream and handed out ``chunk_bytes`` of whole
lines at a time. Executors read their ranges themselves: the paths must be
readable by every executor, as for any Spark file source.
"""

from __future__ import annotations

import gzip
import heapq
import mmap
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from preprocess.errors import PreprocessError

RANGE_BYTES = 32 << 20  # input range per task; any value gives the same output
INPUT_ERROR = "PreprocessInputError"  # marks a worker's error about an input file


@dataclass(frozen=True)
class InputRange:
    """A byte range of one input file: the lines whose first byte lies in [start, end)."""

    index: int
    path: str
    start: int
    end: int
    train: bool
    chunk_bytes: int = RANGE_BYTES

    @property
    def compressed(self) -> bool:
        return self.path.endswith(".gz")

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_ranges(train_files: list[Path], eval_files: list[Path], range_bytes: int = RANGE_BYTES) -> list[InputRange]:
    """Ranges of the input files, in file order then byte order: the order of the output rows."""
    ranges: list[InputRange] = []
    for files, train in ((train_files, True), (eval_files, False)):
        for f in files:
            if not Path(f).is_file():
                raise PreprocessError(f"missing input file {f}")
            size = Path(f).stat().st_size
            if str(f).endswith(".gz"):
                bounds = [(0, size)]
            else:
                bounds = [(s, min(s + range_bytes, size)) for s in range(0, size, range_bytes)] or [(0, 0)]
            ranges += [InputRange(len(ranges) + k, str(f), s, e, train, range_bytes) for k, (s, e) in enumerate(bounds)]
    return ranges


def group_ranges(sizes: list[int], groups: int) -> list[list[int]]:
    """Indices 0 .. len(sizes) - 1 in at most ``groups`` lists of about equal total size, each in index order
    and ordered by their first index.

    One Spark task per group: a task costs tens of milliseconds of scheduling
    whatever its size, so a few large tasks per core beat one per range."""
    groups = max(1, min(groups, len(sizes)))
    loads = [(0, g) for g in range(groups)]  # a heap of (total size, group)
    members: list[list[int]] = [[] for _ in range(groups)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):  # largest first, to the least loaded
        load, g = heapq.heappop(loads)
        members[g].append(i)
        heapq.heappush(loads, (load + sizes[i], g))
    return sorted(sorted(m) for m in members if m)


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


def read_chunks(r: InputRange) -> Iterator[bytes | memoryview]:
    """The whole lines of a range, as one or more ``\\n``-separated chunks."""
    if r.compressed:
        with gzip.open(r.path, "rb") as f:
            rest = b""
            while block := f.read(r.chunk_bytes):
                block = rest + block
                cut = block.rfind(b"\n") + 1
                rest = block[cut:]
                if cut:
                    yield block[:cut]
            if rest:
                yield rest
        return
    with open(r.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        lo, hi = _line_start(f, r.start, size), _line_start(f, r.end, size)
        if hi <= lo:
            return
        # Mapped, not read: no copy of the range into fresh memory (a tenth of the parse time). The
        # mapping goes when the last view of it does.
        at = lo - lo % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(f.fileno(), hi - at, access=mmap.ACCESS_READ, offset=at)
    mapped.madvise(mmap.MADV_WILLNEED)
    yield memoryview(mapped)[lo - at : hi - at]


def checked_chunks(r: InputRange) -> Iterator[bytes | memoryview]:
    """``read_chunks``; a file that cannot be read raises an error the driver turns into one line."""
    try:
        yield from read_chunks(r)
    except EOFError as err:
        raise RuntimeError(f"{INPUT_ERROR}: {r.path}: truncated gzip file ({err})") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise RuntimeError(f"{INPUT_ERROR}: {r.path}: corrupt gzip file ({err})") from err
    except OSError as err:
        raise RuntimeError(f"{INPUT_ERROR}: {r.path}: cannot read it ({type(err).__name__}: {err})") from err
