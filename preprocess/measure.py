"""Measurements of the preprocessing job: the raw parse floor it is compared with, and peak memory."""

from __future__ import annotations

import gzip
import math
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv

from preprocess.parse import NUM_FIELDS


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
