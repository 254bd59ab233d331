"""Download the Criteo 1 TB click logs (``day_N.gz``), resumably, and decompress them.

Like the original workflow (Intel's e2eAIOK DLRM), the days come from a public
bucket as ``<base URL>/day_<N>.gz``. A transfer goes to ``day_N.gz.part`` and
an interrupted one resumes from there with an HTTP range request; only a
complete, size-checked file is renamed to ``day_N.gz``, and its size is
recorded next to it in ``day_N.gz.size`` so later runs reuse it without asking
the server. The pipeline reads the decompressed ``day_N`` (see
``preprocess.layout``), which ``decompress_day`` writes.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import shutil
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from http.client import HTTPException, HTTPResponse
from pathlib import Path

from bench.fsutil import atomic_open, atomic_write_text
from preprocess.errors import DataError
from preprocess.layout import day_file

DEFAULT_BASE_URL = "https://storage.googleapis.com/criteo-cail-datasets"
# A Criteo day is ~15 GB gzipped and ~45-50 GB as text; used only to estimate disk space.
RAW_PER_GZIP = 3.2
# Seconds a connect or a single read may stall before the transfer counts as failed.
TIMEOUT = 60
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def day_url(base_url: str, day: int) -> str:
    return f"{base_url.rstrip('/')}/day_{day}.gz"


def gz_file(dest: Path, day: int) -> Path:
    return Path(dest) / f"day_{day}.gz"


def _part_file(gz: Path) -> Path:
    return gz.with_name(gz.name + ".part")


def _size_file(gz: Path) -> Path:
    return gz.with_name(gz.name + ".size")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _network_error(url: str, err: Exception) -> DataError:
    """One line for a failed request: HTTP status, or why the server could not be reached."""
    if isinstance(err, urllib.error.HTTPError):
        hint = "; check the day numbers and the base URL" if err.code == 404 else ""
        return DataError(f"HTTP {err.code} {err.reason} for {url}{hint}")
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    return DataError(f"cannot download {url}: {reason}")


def remote_size(url: str) -> int:
    """The file's size in bytes, from the Content-Length of a HEAD request."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT) as resp:
            length = resp.headers.get("Content-Length")
    except (OSError, HTTPException) as err:
        raise _network_error(url, err) from err
    if length is None or not length.isdigit():
        raise DataError(f"the server gives no size (Content-Length) for {url}")
    return int(length)


def _recorded_size(gz: Path) -> int | None:
    """The size recorded when ``gz`` was completed, if ``gz`` is still that size."""
    try:
        size = int(_size_file(gz).read_text())
        return size if gz.stat().st_size == size else None
    except (OSError, ValueError):
        return None


def _part_bytes(gz: Path, size: int) -> int:
    """Bytes a resumed transfer of ``gz`` can keep (a ``.part`` larger than the file is stale)."""
    part = _part_file(gz)
    have = part.stat().st_size if part.is_file() else 0
    return have if have <= size else 0


def required_bytes(sizes: dict[int, int], dest: Path) -> int:
    """Disk space still needed in ``dest`` for these days (day -> gzip size in bytes).

    Counts what remains to download (less any ``.part`` already there) plus the
    estimated decompressed size of every day whose ``day_N`` is not there yet.
    """
    need = 0
    for day, size in sizes.items():
        gz = gz_file(dest, day)
        complete = gz.is_file() and gz.stat().st_size == size
        need += 0 if complete else size - _part_bytes(gz, size)
        if not day_file(dest, day).is_file():
            need += math.ceil(size * RAW_PER_GZIP)
    return need


def check_free_space(need: int, where: Path, what: str) -> None:
    """Raise DataError unless ``where`` has ``need`` bytes free; ``what`` names what needs them."""
    free = shutil.disk_usage(where).free
    if need > free:
        raise DataError(f"not enough disk space in {where}: {what} need {_gb(need)}, only {_gb(free)} free")


def _response_start_and_total(resp: HTTPResponse, url: str) -> tuple[int, int | None]:
    """Offset the body starts at, and the whole file's size if the response states it."""
    if resp.status == 206:
        match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if match is None:
            raise DataError(f"unexpected Content-Range {resp.headers.get('Content-Range')!r} from {url}")
        return int(match[1]), None if match[2] == "*" else int(match[2])
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _size_mismatch(url: str, part: Path, expected: int, got: int) -> DataError:
    # The server's file is not the one the size came from, so the partial bytes are worthless.
    part.unlink(missing_ok=True)
    return DataError(f"size mismatch for {url}: expected {expected} bytes, the server sent {got}; run again")


def _fetch(url: str, gz: Path, size: int, progress: Callable[[int], None], chunk: int) -> None:
    """Download ``url`` to ``gz`` via ``gz.part``, resuming what is there; check the size."""
    part = _part_file(gz)
    have = _part_bytes(gz, size)
    if have < size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT) as resp:
                start, total = _response_start_and_total(resp, url)
                if total is not None and total != size:
                    raise _size_mismatch(url, part, size, total)
                if start != have and start != 0:
                    raise DataError(f"{url} answered a request for bytes {have}- with bytes {start}-")
                # start == 0: a fresh transfer, or a server that ignored the range and sends it all.
                with open(part, "ab" if start else "wb") as f:
                    while block := resp.read(chunk):
                        f.write(block)
                        progress(len(block))
        except (OSError, HTTPException) as err:
            error = _network_error(url, err)
            if part.is_file() and part.stat().st_size:
                error = DataError(f"{error}; run again to resume from {part}")
            raise error from err
    got = part.stat().st_size
    if got < size:
        raise DataError(f"download of {url} stopped at {got} of {size} bytes; run again to resume from {part}")
    if got > size:
        raise _size_mismatch(url, part, size, got)
    os.replace(part, gz)
    atomic_write_text(_size_file(gz), f"{size}\n")


def download_days(
    days: Iterable[int],
    dest: Path,
    base_url: str = DEFAULT_BASE_URL,
    progress: Callable[[int], None] | None = None,
    chunk: int = 1 << 20,
) -> list[Path]:
    """Make sure ``dest/day_N.gz`` is complete for every day; return those paths.

    A complete file is reused; a ``.part`` left by an interrupted run is
    resumed. Before any transfer, the free space in ``dest`` is checked against
    the remaining downloads plus the days' decompressed size. ``progress(n)``
    is called with the number of bytes just received. Raises DataError on
    network errors, size mismatches and too little disk space.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    days = list(days)
    sizes: dict[int, int] = {}
    for day in days:
        recorded = _recorded_size(gz_file(dest, day))
        sizes[day] = recorded if recorded is not None else remote_size(day_url(base_url, day))
    what = f"Criteo days {', '.join(str(d) for d in days)} (downloads plus ~{RAW_PER_GZIP}x decompressed)"
    check_free_space(required_bytes(sizes, dest), dest, what)
    for day in days:
        gz = gz_file(dest, day)
        if gz.is_file() and gz.stat().st_size == sizes[day]:
            if _recorded_size(gz) is None:
                atomic_write_text(_size_file(gz), f"{sizes[day]}\n")
            continue
        _fetch(day_url(base_url, day), gz, sizes[day], progress or (lambda n: None), chunk)
    return [gz_file(dest, day) for day in days]


def decompress_day(gz: Path, out: Path) -> None:
    """Stream-decompress ``gz`` to ``out``; ``out`` appears only when complete.

    Raises DataError naming ``gz`` if it is truncated or corrupt.
    """
    gz, out = Path(gz), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(out, "wb") as dst, gzip.open(gz, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{gz} is truncated or corrupt ({err}); delete it and run again to download it anew") from err
