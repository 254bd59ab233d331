"""The Spark preprocessing job: Criteo TSV days -> the training-ready layout (``preprocess/layout.py``).

Spark schedules the work, sums the vocabulary counts across executors and
retries failed tasks; the per-row work runs in vectorised Python on the
executors (``mapInArrow``), where Arrow's C++ CSV parser and NumPy do in one
pass what a chain of per-column Spark expressions does slowly. Each task
reads its byte ranges of the day files itself (``preprocess/ranges.py``), so
lines never travel through the JVM.

1. **parse and count** (one Spark job over every input range): the ranges
   go to a few tasks per core (a Spark task costs tens of milliseconds
   whatever its size); each task parses and checks the lines of its ranges
   (``preprocess/parse.py``), writes the typed columns of the valid rows to
   ``_scratch/parsed/<range>.arrow`` and a row account next to them, and
   yields the (column, value) counts of its training rows, hashed into
   buckets; Spark shuffles the buckets, and one task per bucket sums them
   and keeps the values seen at least ``freq_threshold`` times
   (``_scratch/counts``, ``preprocess/vocab.py``).
2. **vocabularies** (driver, one column at a time): ids 1, 2, ... by
   descending count, ties by ascending value; id 0 is missing, rare or
   unseen. Each column's lookup table is written once (``_scratch/lookup``).
3. **map** (one Spark job, a few tasks per core): each task memory-maps the
   lookup tables, maps its parsed rows to ids and writes them straight into
   the final ``.npy`` files at its rows' offset (``preprocess/arrays.py``),
   so no pass over the rows runs on the driver.
   The evaluation day's rows keep their line order; its first half is
   ``test``, the second ``val``.

The output is byte-identical whatever the engine, executors, cores or range
size: rows keep file and line order, counts are exact integers and ties are
broken by value. Category values are parsed from 8-digit hex into integers
and ids are integers throughout: nothing passes through a float.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import time
import zipimport
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from bench.config import NUM_DENSE, NUM_SPARSE, PreprocessConfig
from bench.fsutil import atomic_write_json
from preprocess.arrays import NpyFile, create_split, file_digests, pwrite
from preprocess.errors import PreprocessError
from preprocess.layout import FORMAT_VERSION, MANIFEST, SPLITS, cat_name, id_dtype
from preprocess.measure import PeakRss, parse_floor_rows_per_s  # noqa: F401 - parse_floor_rows_per_s: the pipeline's name
from preprocess.parse import DENSE, PARSED_ARROW, PIECE_BYTES, REJECT_SAMPLE, SPARSE, parse_chunk
from preprocess.ranges import INPUT_ERROR, RANGE_BYTES, InputRange, checked_chunks, group_ranges, plan_ranges
from preprocess.vocab import (KeptSlice, count_blobs, direct_lookup, load_lookups, lookup_ids, merge_counts, save_kept,
                              save_vocabularies, value_counts)

STEPS = 4  # progress() calls in run()
JOB_VERSION = 2  # bump when the output of the same inputs and settings changes
TASKS_PER_CORE = 3  # per pass: enough to even out the cores, few enough that Spark's per-task cost stays small

# Partial counts of one bucket of keys (key = column << 32 | value), as raw int64 bytes.
COUNTS_SCHEMA = T.StructType(
    [T.StructField("bucket", T.IntegerType(), False), T.StructField("keys", T.BinaryType(), False),
     T.StructField("counts", T.BinaryType(), False)]
)
# Per merged bucket and column: rows [start, stop) of the bucket's file hold the column's kept values.
KEPT_SCHEMA = T.StructType(
    [T.StructField("bucket", T.IntegerType(), False), T.StructField("column", T.IntegerType(), False),
     T.StructField("start", T.LongType(), False), T.StructField("stop", T.LongType(), False)]
)
_KEPT_ARROW = pa.schema([("bucket", pa.int32(), False), ("column", pa.int32(), False), ("start", pa.int64(), False),
                         ("stop", pa.int64(), False)])
# Per mapped range: OOV values per column (column -1: rows with at least one) in test (0) or val (1).
OOV_SCHEMA = T.StructType(
    [T.StructField("split", T.ByteType(), False), T.StructField("column", T.IntegerType(), False),
     T.StructField("count", T.LongType(), False)]
)


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
# Step 1: parse every range, write its rows, count its training values (runs on the executors)


def _parsed_path(scratch: str, index: int) -> str:
    return f"{scratch}/parsed/{index:06d}.arrow"


def _parse_task(groups: list[list[InputRange]], scratch: str, max_ind_range: int, buckets: int,
                batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    _lazy_zip_caches()
    for batch in batches:
        for task in batch.column(0).to_pylist():
            for r in groups[task]:
                yield from _parse_range(r, scratch, max_ind_range, buckets)


def _parse_range(r: InputRange, scratch: str, max_ind_range: int, buckets: int) -> Iterator[pa.RecordBatch]:
    """Write the range's valid rows and its account (rows, rejected, sample); yield the counts of its
    training values."""
    path = _parsed_path(scratch, r.index)
    rows = rejected = 0
    sample: list[str] = []
    # Written under a temporary name and renamed: a retried task leaves the same files.
    with pa.OSFile(path + ".tmp", "wb") as sink, pa.ipc.new_file(sink, PARSED_ARROW) as writer:
        for chunk in checked_chunks(r):
            parsed = parse_chunk(chunk, max_ind_range)
            rows, rejected = rows + len(parsed), rejected + parsed.rejected
            sample += parsed.sample[: REJECT_SAMPLE - len(sample)]
            if len(parsed):
                writer.write_table(parsed.table)
                if r.train:
                    yield count_blobs(*value_counts(parsed), buckets)
    os.replace(path + ".tmp", path)
    with open(path + ".json.tmp", "w") as f:
        json.dump({"rows": rows, "rejected": rejected, "sample": sample}, f)
    os.replace(path + ".json.tmp", path + ".json")


def _merge_task(scratch: str, threshold: int, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Sum the partial counts of the buckets in this partition; write the keys kept, per bucket, and say
    where each column's are."""
    _lazy_zip_caches()
    parts: dict[int, list[tuple[bytes, bytes]]] = {}
    for batch in batches:
        for bucket, keys, counts in zip(*(batch.column(j).to_pylist() for j in range(3))):
            parts.setdefault(bucket, []).append((keys, counts))
    for bucket, blobs in sorted(parts.items()):
        keys, counts = merge_counts(np.frombuffer(b"".join(k for k, _ in blobs), np.int64),
                                    np.frombuffer(b"".join(c for _, c in blobs), np.int64))
        keep = counts >= threshold
        kept = save_kept(f"{scratch}/counts/{bucket:06d}.bin", keys[keep], counts[keep])
        yield pa.RecordBatch.from_pydict({"bucket": [bucket] * len(kept), "column": [j for j, _ in kept],
                                          "start": [k.start for _, k in kept], "stop": [k.stop for _, k in kept]},
                                         schema=_KEPT_ARROW)


def count_and_parse(spark: SparkSession, ranges: list[InputRange], scratch: Path,
                    cfg: PreprocessConfig) -> list[list[KeptSlice]]:
    """Run step 1; return, per column, where the (key, count) pairs of its kept training values are
    (key = column << 32 | value)."""
    (scratch / "parsed").mkdir(parents=True, exist_ok=True)
    (scratch / "counts").mkdir(parents=True, exist_ok=True)
    parallelism = spark.sparkContext.defaultParallelism
    train_bytes = sum(r.size for r in ranges if r.train)
    # Enough buckets to spread the merge over the cores and keep each merge to ~256 MB of input text.
    buckets = 4 * max(parallelism, -(-train_bytes // (256 << 20)))
    groups = group_ranges([r.size for r in ranges], TASKS_PER_CORE * parallelism)
    parse = functools.partial(_parse_task, [[ranges[i] for i in g] for g in groups], str(scratch),
                              cfg.max_ind_range, buckets)
    merge = functools.partial(_merge_task, str(scratch), max(cfg.freq_threshold, 1))
    partial_counts = spark.range(0, len(groups), 1, len(groups)).mapInArrow(parse, COUNTS_SCHEMA)
    kept = partial_counts.repartition(max(1, buckets // 4), "bucket").mapInArrow(merge, KEPT_SCHEMA)
    rows = sorted(_spark_action(kept.collect), key=lambda r: (r["bucket"], r["column"]))
    columns: list[list[KeptSlice]] = [[] for _ in range(NUM_SPARSE)]
    for r in rows:
        path = str(scratch / "counts" / f"{r['bucket']:06d}.bin")
        columns[r["column"]].append(KeptSlice(path, r["start"], r["stop"]))
    return columns


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


Outputs = dict[str, dict[str, NpyFile]]  # split -> file name -> file


@dataclass(frozen=True)
class Lookups:
    """Each column's lookup table (``preprocess/vocab.py``), whether they are direct, and each column's id dtype."""

    tables: list[np.ndarray]
    direct: bool
    dtypes: list[np.dtype]


def _map_task(groups: list[list[Target]], scratch: str, lookup_dir: str, direct: bool, outputs: Outputs,
              id_dtypes: list[str], test_rows: int, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    _lazy_zip_caches()
    # Mapped for the task, not kept by the worker: the driver then deletes the scratch folder, also on NFS.
    lookups = Lookups(load_lookups(lookup_dir), direct, [np.dtype(d) for d in id_dtypes])
    for batch in batches:
        for task in batch.column(0).to_pylist():
            for target in groups[task]:
                yield from _map_range(target, scratch, lookups, outputs, test_rows)


def _map_range(target: Target, scratch: str, lookups: Lookups, outputs: Outputs,
               test_rows: int) -> Iterator[pa.RecordBatch]:
    at = target.at  # row of the next rows in the training split or the evaluation day
    with pa.OSFile(_parsed_path(scratch, target.index), "rb") as source:
        reader = pa.ipc.open_file(source)
        # A range's worth of pieces at a time (a gzip day is one range): memory stays bounded.
        step = max(1, RANGE_BYTES // PIECE_BYTES)
        for b in range(0, reader.num_record_batches, step):
            table = pa.Table.from_batches(
                [reader.get_batch(i) for i in range(b, min(b + step, reader.num_record_batches))], PARSED_ARROW)
            yield from _map_rows(table, at, target.train, lookups, outputs, test_rows)
            at += table.num_rows
    assert at == target.at + target.rows, (target, at)


def _map_rows(table: pa.Table, at: int, train: bool, lookups: Lookups, outputs: Outputs,
              test_rows: int) -> Iterator[pa.RecordBatch]:
    n = table.num_rows
    label = table.column("label").to_numpy()
    dense = np.column_stack([table.column(c).to_numpy() for c in DENSE])
    ids, oov = [], []
    for j, c in enumerate(SPARSE):
        found, valid = lookup_ids(lookups.tables[j], table.column(c), lookups.direct, lookups.dtypes[j])
        ids.append(found)
        if not train:  # present, but rare or unseen in training
            oov.append(found == 0 if valid is None else (found == 0) & valid)
    # (split, its row for row lo of the table, rows [lo, hi) of the table)
    if train:
        pieces = [("train", at, 0, n)]
    else:
        cut = min(max(test_rows - at, 0), n)
        pieces = [("test", at, 0, cut), ("val", at + cut - test_rows, cut, n)]
    for split, row, lo, hi in pieces:
        if hi <= lo:
            continue
        files = outputs[split]
        pwrite(files["label"], row, label[lo:hi])
        pwrite(files["dense"], row, dense[lo:hi])
        for j in range(NUM_SPARSE):
            pwrite(files[cat_name(j)], row, ids[j][lo:hi])
        if oov:
            per_column = [int(np.count_nonzero(o[lo:hi])) for o in oov]
            any_row = int(np.count_nonzero(np.logical_or.reduce([o[lo:hi] for o in oov])))
            yield pa.RecordBatch.from_pydict(
                {"split": np.full(NUM_SPARSE + 1, SPLITS.index(split) - 1, np.int8),
                 "column": np.arange(-1, NUM_SPARSE, dtype=np.int32),
                 "count": np.array([any_row, *per_column], np.int64)})


def map_and_write(spark: SparkSession, targets: list[Target], scratch: Path, max_ind_range: int, outputs: Outputs,
                  vocab_sizes: list[int], test_rows: int) -> dict:
    """Run step 3; return the OOV account of the evaluation day."""
    groups = group_ranges([t.rows for t in targets], TASKS_PER_CORE * spark.sparkContext.defaultParallelism)
    task = functools.partial(_map_task, [[targets[i] for i in g] for g in groups], str(scratch),
                             str(scratch / "lookup"), direct_lookup(max_ind_range), outputs,
                             [str(id_dtype(v)) for v in vocab_sizes], test_rows)
    rows = _spark_action(lambda: spark.range(0, len(groups), 1, len(groups))
                         .mapInArrow(task, OOV_SCHEMA).collect()) if targets else []
    oov = {"test": np.zeros(NUM_SPARSE + 1, np.int64), "val": np.zeros(NUM_SPARSE + 1, np.int64)}
    for r in rows:
        oov[("test", "val")[r["split"]]][r["column"] + 1] += r["count"]
    return {"oov_rows": {s: int(v[0]) for s, v in oov.items()},
            "oov_per_column": {s: [int(x) for x in v[1:]] for s, v in oov.items()}}


# ---------------------------------------------------------------------------------------------
# The whole job (driver)


def _summaries(scratch: Path, ranges: list[InputRange]) -> list[dict]:
    out = []
    for r in ranges:
        path = Path(_parsed_path(str(scratch), r.index) + ".json")
        if not path.is_file():
            raise PreprocessError(f"the parse task of {r.path} bytes {r.start}..{r.end} left no account ({path})")
        out.append(json.loads(path.read_text()))
    return out


def run(
    spark: SparkSession,
    cfg: PreprocessConfig,
    train_files: list[Path],
    eval_files: list[Path],
    out_root: Path,
    progress: Callable[[str], None] = lambda step: None,
    range_bytes: int = RANGE_BYTES,
) -> dict:
    """Run the whole job; write ``out_root`` (via a temporary folder) and return its manifest."""
    tmp = out_root.with_name(out_root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = tmp / "_scratch"
    scratch.mkdir(parents=True)
    try:
        manifest = _run(spark, cfg, train_files, eval_files, tmp, scratch, progress, range_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_root, ignore_errors=True)
    tmp.rename(out_root)
    return manifest


def _run(spark: SparkSession, cfg: PreprocessConfig, train_files: list[Path], eval_files: list[Path], tmp: Path,
         scratch: Path, progress: Callable[[str], None], range_bytes: int) -> dict:
    started = time.perf_counter()
    steps: dict[str, float] = {}
    with PeakRss() as peak:
        clock = time.perf_counter()
        progress("parse lines and count training values")
        ranges = plan_ranges(train_files, eval_files, range_bytes)
        kept = count_and_parse(spark, ranges, scratch, cfg)
        summaries = _summaries(scratch, ranges)
        steps["parse_and_count"] = round(time.perf_counter() - clock, 3)

        clock = time.perf_counter()
        progress("build vocabularies")
        vocab_sizes = save_vocabularies(kept, tmp / "vocab", scratch / "lookup", cfg.max_ind_range)
        targets, at = [], {True: 0, False: 0}
        for r, summary in zip(ranges, summaries):
            if summary["rows"]:
                targets.append(Target(r.index, r.train, at[r.train], summary["rows"]))
            at[r.train] += summary["rows"]
        train_rows, eval_rows = at[True], at[False]
        rejected = {k: sum(m["rejected"] for r, m in zip(ranges, summaries) if r.train == t)
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
        oov = map_and_write(spark, targets, scratch, cfg.max_ind_range, outputs, vocab_sizes, test_rows)
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
        "timing": {"steps_seconds": steps, "input_ranges": len(ranges), "peak_rss_bytes": peak.result()},
    }
    # Throughput once Spark is up, whole and per executor core (the figure to compare across clusters).
    seconds, cores = time.perf_counter() - started, cfg.executors * cfg.executor_cores
    rate = rows_per_s(manifest, seconds)
    manifest["timing"].update(job_seconds=round(seconds, 3), cores=cores, rows_per_s=round(rate, 1),
                              rows_per_s_per_core=round(rate / cores, 1))
    atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def rows_per_s(manifest: dict, seconds: float) -> float:
    read = sum(manifest["rows_read"].values())
    return read / seconds if seconds > 0 else math.nan


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
