"""The Kaggle Display Advertising Challenge set, split into day files.

Kaggle's ``train.txt`` (~45.8M lines in Criteo's TSV format, see
``preprocess.layout``) is one file with no days. Like the reference DLRM, it is
cut into 7 consecutive parts of ``total // 7`` lines, the first ``total % 7``
parts one line longer; parts 0..5 train and part 6 evaluates. The data cannot
be downloaded without a Kaggle account, so the user places it in
``<DATA_DIR>/kaggle/train.txt``; the day files go to ``<DATA_DIR>/raw/kaggle/``.
"""

from __future__ import annotations

from pathlib import Path

from bench.config import DataConfig
from bench.fsutil import atomic_open, atomic_write_json, read_json
from preprocess.errors import DataError
from preprocess.download import check_free_space
from preprocess.layout import DATASET_MANIFEST, day_file

DAYS = 7
EVAL_DAY = DAYS - 1
# Read size for counting and copying: large enough that per-call overhead does not matter.
CHUNK = 1 << 24


def source_file(cfg: DataConfig) -> Path:
    return Path(cfg.dir) / "kaggle" / "train.txt"


def raw_dir(cfg: DataConfig) -> Path:
    return Path(cfg.dir) / "raw" / "kaggle"


def day_lines(total: int, days: int = DAYS) -> list[int]:
    """Lines per day: ``total // days`` each, the first ``total % days`` days one more (as DLRM does)."""
    base, extra = divmod(total, days)
    return [base + (day < extra) for day in range(days)]


def _count_lines(path: Path) -> tuple[list[int], int]:
    """Newlines in each CHUNK-sized piece of the file, and its number of lines, in one binary read."""
    counts = []
    last = b""
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            counts.append(block.count(b"\n"))
            last = block[-1:]
    # A last line without a newline is still a line.
    return counts, sum(counts) + (last not in (b"", b"\n"))


def _offset_after_line(path: Path, counts: list[int], line: int) -> int:
    """Byte offset just past the ``line``-th newline (1-based), re-reading only its chunk."""
    seen = 0
    for index, count in enumerate(counts):
        if seen + count >= line:
            with open(path, "rb") as f:
                f.seek(index * CHUNK)
                block = f.read(CHUNK)
            position = -1
            for _ in range(line - seen):
                position = block.index(b"\n", position + 1)
            return index * CHUNK + position + 1
        seen += count
    raise ValueError(f"{path} has fewer than {line} lines")


def _copy_range(src: Path, start: int, end: int, out: Path) -> None:
    """Copy bytes ``start:end`` of ``src`` to ``out`` through a temporary name, so ``out`` is whole or absent."""
    with atomic_open(out, "wb") as dst, open(src, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining:
            block = f.read(min(CHUNK, remaining))
            if not block:  # without this, a file shrinking under us would loop forever
                raise DataError(f"{src} changed while being split; run again")
            dst.write(block)
            remaining -= len(block)


def _source_record(train: Path) -> dict:
    stat = train.stat()
    # Size and modification time identify the file even if DATA_DIR moves (mv and cp -a keep them).
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _reusable(folder: Path, source: dict) -> dict | None:
    """The stored manifest, if its day files were split from this very ``train.txt`` and are intact."""
    try:
        manifest = read_json(folder / DATASET_MANIFEST)
    except (OSError, ValueError):
        return None
    if manifest.get("split_from") != source:
        return None
    intact = all((folder / name).is_file() and (folder / name).stat().st_size == size
                 for name, size in manifest["files"].items())
    return manifest if intact else None


def _split(train: Path, folder: Path, source: dict) -> dict:
    """Write the 7 day files and ``dataset.json``; return the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    # Files of an earlier split are stale: drop them (and the manifest vouching for them) first.
    for path in [folder / DATASET_MANIFEST, *(day_file(folder, d) for d in range(DAYS))]:
        path.unlink(missing_ok=True)
    check_free_space(source["size"], folder, f"the Kaggle day files (a copy of {train})")
    counts, total = _count_lines(train)
    if total < DAYS:
        raise DataError(f"{train} has {total} lines, too few for {DAYS} days; Kaggle's train.txt has ~45.8M")
    rows = day_lines(total)
    ends = [sum(rows[: d + 1]) for d in range(DAYS - 1)]
    bounds = [0, *(_offset_after_line(train, counts, line) for line in ends), source["size"]]
    for day in range(DAYS):
        _copy_range(train, bounds[day], bounds[day + 1], day_file(folder, day))
    manifest = {
        "source": "kaggle",
        "format": "criteo-tsv",
        "train_days": list(range(EVAL_DAY)),
        "eval_day": EVAL_DAY,
        "rows_per_day": rows,
        "files": {day_file(folder, d).name: bounds[d + 1] - bounds[d] for d in range(DAYS)},
        "split_from": source,
    }
    atomic_write_json(folder / DATASET_MANIFEST, manifest)
    return manifest


def split_days(cfg: DataConfig) -> tuple[Path, dict]:
    """Split ``<DATA_DIR>/kaggle/train.txt`` into ``day_0`` .. ``day_6``; return their folder and manifest.

    Reuses an earlier split of the same file (same size and modification
    time). Training days are 0..5, at most ``cfg.days`` of them; day 6
    evaluates. Raises DataError if ``train.txt`` is missing, too short, or
    the disk too full for the copy.
    """
    train = source_file(cfg)
    if not train.is_file():
        raise DataError(
            f"no Kaggle data: put Criteo's Display Advertising Challenge train.txt at {train} "
            "(it cannot be downloaded without a Kaggle account), or use DATA=synthetic"
        )
    folder = raw_dir(cfg)
    source = _source_record(train)
    manifest = _reusable(folder, source) or _split(train, folder, source)
    return folder, {**manifest, "train_days": list(range(min(EVAL_DAY, cfg.days)))}
