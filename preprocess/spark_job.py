"""The Spark preprocessing job: Criteo TSV days -> the training-ready layout.

Spark reads the lines and moves them between executors; the per-row work runs
in vectorised Python on the executors (``mapInArrow``), where Arrow's C++ CSV
parser and NumPy do in one pass what a chain of per-column Spark expressions
or joins does slowly:
1. count every (column, value) over the training days only, per partition,
   and sum the counts in Spark; values seen at least ``freq_threshold`` times
   get ids 1, 2, ... by descending count (id 0 is missing, rare or unseen);
2. parse each day again and map values to ids with a sorted-array lookup
   against the vocabularies written in step 1; rows that fail a check are
   not dropped but written with their text, so they are counted;
3. pack the Parquet parts into the memory-mapped arrays the loader reads.

Category values are parsed from 8-digit hex into int64 and ids are integers
throughout: nothing passes through a float.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from bench.config import NUM_DENSE, NUM_SPARSE, PreprocessConfig
from bench.fsutil import atomic_write_json
from preprocess.errors import PreprocessError
from preprocess.layout import FORMAT_VERSION, MANIFEST, cat_name, id_dtype

NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
DENSE = [f"i{j}" for j in range(NUM_DENSE)]
SPARSE = [f"c{j}" for j in range(NUM_SPARSE)]
REJECT_SAMPLE = 20
STEPS = 4  # progress() calls in run()

COUNT_SCHEMA = T.StructType(
    [T.StructField("column", T.IntegerType(), False), T.StructField("value", T.LongType(), False),
     T.StructField("count", T.LongType(), False)]
)
# A mapped row, or a rejected one: then ``line`` holds its text and the rest is zero.
MAPPED_SCHEMA = T.StructType(
    [T.StructField("label", T.ByteType(), False)]
    + [T.StructField(c, T.FloatType(), False) for c in DENSE]
    + [T.StructField(c, T.IntegerType(), False) for c in SPARSE]
    + [T.StructField("line", T.StringType(), True)]
)

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _ch in enumerate(b"0123456789abcdef"):
    _HEX[_ch] = _i
for _i, _ch in enumerate(b"ABCDEF"):
    _HEX[_ch] = 10 + _i
_NIBBLE_WEIGHTS = 16 ** np.arange(7, -1, -1, dtype=np.int64)


class Parsed:
    """One batch of lines, parsed and checked: typed columns of the valid rows, text of the rejected."""

    def __init__(self, label: np.ndarray, dense: list[np.ndarray], sparse: list[np.ndarray], rejected: list[str]):
        self.label, self.dense, self.sparse, self.rejected = label, dense, sparse, rejected


def parse_lines(lines: pa.Array) -> Parsed:
    """Criteo lines -> label, 13 int64 columns (missing -> 0), 26 int64 hex values (missing -> -1).

    A line is rejected unless it has 40 fields, a 0/1 label, integers of up
    to 18 digits (optionally negative) or empty, and categories of exactly 8
    hex digits or empty.
    """
    rejected: list[str] = []

    def on_bad_shape(row) -> str:
        rejected.append(row.text)
        return "skip"

    table = pa_csv.read_csv(
        pa.BufferReader(_joined(lines)),
        read_options=pa_csv.ReadOptions(column_names=[f"f{j}" for j in range(NUM_FIELDS)], use_threads=False,
                                        block_size=1 << 28),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                          ignore_empty_lines=False, invalid_row_handler=on_bad_shape),
        convert_options=pa_csv.ConvertOptions(column_types={f"f{j}": pa.string() for j in range(NUM_FIELDS)}),
    )
    n = table.num_rows
    fields = [table.column(j).combine_chunks() for j in range(NUM_FIELDS)]
    valid = pc.is_in(fields[0], pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
    dense = []
    for f in fields[1 : 1 + NUM_DENSE]:
        ok = pc.match_substring_regex(f, r"^(-?[0-9]{1,18})?$").to_numpy(zero_copy_only=False)
        valid &= ok
        cleaned = pc.if_else(pa.array(ok & (pc.utf8_length(f).to_numpy(zero_copy_only=False) > 0)), f, "0")
        dense.append(pc.cast(cleaned, pa.int64()).to_numpy())
    sparse = []
    for f in fields[1 + NUM_DENSE :]:
        values, ok = _hex_values(f)
        valid &= ok
        sparse.append(values)
    if not valid.all():
        bad = np.flatnonzero(~valid)
        rejected += ["\t".join(f[int(i)].as_py() for f in fields) for i in bad[:REJECT_SAMPLE]]
        rejected += [""] * max(0, len(bad) - REJECT_SAMPLE)  # counted; only a sample keeps its text
    label = fields[0].to_numpy(zero_copy_only=False)[valid].astype(np.int8) if n else np.empty(0, np.int8)
    return Parsed(label, [d[valid] for d in dense], [s[valid] for s in sparse], rejected)


def _joined(lines: pa.Array) -> pa.Buffer:
    """The lines of a Spark text batch as one newline-separated buffer (no copy per line)."""
    lines = pa.array(lines, type=pa.large_string()) if lines.type != pa.large_string() else lines
    offsets = np.frombuffer(lines.buffers()[1], np.int64)[lines.offset : lines.offset + len(lines) + 1]
    data = np.frombuffer(lines.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    return pa.py_buffer(np.insert(data, offsets[1:] - offsets[0], ord("\n")))


def _hex_values(field: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """8-digit hex strings -> int64 (empty -> -1), and which rows were well formed."""
    field = pa.array(field, type=pa.large_string())
    n = len(field)
    offsets = np.frombuffer(field.buffers()[1], np.int64)[field.offset : field.offset + n + 1]
    data = np.frombuffer(field.buffers()[2], np.uint8) if field.buffers()[2] is not None else np.empty(0, np.uint8)
    lengths = np.diff(offsets)
    values = np.full(n, -1, dtype=np.int64)
    ok = (lengths == 0) | (lengths == 8)
    full = np.flatnonzero(lengths == 8)
    if len(full):
        nibbles = _HEX[data[offsets[full][:, None] + np.arange(8)]]
        good = (nibbles != 255).all(axis=1)
        ok[full[~good]] = False
        values[full[good]] = nibbles[good].astype(np.int64) @ _NIBBLE_WEIGHTS
    return values, ok


def count_values(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Per-partition (column, value, count) of the valid rows: the partial sums of the vocabulary count."""
    for batch in batches:
        parsed = parse_lines(batch.column(0))
        for j, values in enumerate(parsed.sparse):
            uniq, counts = np.unique(values[values >= 0], return_counts=True)
            yield pa.RecordBatch.from_pydict(
                {"column": np.full(len(uniq), j, np.int32), "value": uniq, "count": counts.astype(np.int64)}
            )


def vocabularies(spark: SparkSession, files: list[Path], freq_threshold: int) -> DataFrame:
    """(column, value, id) for values seen at least ``freq_threshold`` times in ``files``."""
    partial = read_lines(spark, files).mapInArrow(count_values, COUNT_SCHEMA)
    counts = partial.groupBy("column", "value").agg(F.sum("count").alias("count"))
    kept = counts.where(F.col("count") >= max(freq_threshold, 1))
    # Hot values get small ids, so the rows touched most sit together in the table.
    order = Window.partitionBy("column").orderBy(F.col("count").desc(), F.col("value").asc())
    return kept.withColumn("id", F.row_number().over(order))


def read_lines(spark: SparkSession, files: list[Path]) -> DataFrame:
    return spark.read.text([str(f) for f in files])


def save_vocabularies(vocab: DataFrame, scratch: Path, out_dir: Path) -> list[int]:
    """Write each column's values in id order as ``vocab/cat_XX.npy``; return vocabulary sizes (with id 0)."""
    parts = scratch / "vocab.parquet"
    vocab.write.mode("overwrite").partitionBy("column").parquet(str(parts))
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = []
    for j in range(NUM_SPARSE):
        folder = parts / f"column={j}"
        if folder.exists():
            table = pq.read_table(folder, columns=["value", "id"])
            ids = table.column("id").to_numpy()
            values = np.empty(len(ids), dtype=np.int64)
            values[ids - 1] = table.column("value").to_numpy()
        else:
            values = np.empty(0, dtype=np.int64)
        np.save(out_dir / f"{cat_name(j)}.npy", values)
        sizes.append(len(values) + 1)
    return sizes


@functools.lru_cache(maxsize=2)
def _lookup_tables(vocab_dir: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per column: values sorted ascending, and the id of each. Cached per reused Python worker."""
    tables = []
    for j in range(NUM_SPARSE):
        by_id = np.load(f"{vocab_dir}/{cat_name(j)}.npy")
        order = np.argsort(by_id, kind="stable")
        tables.append((by_id[order], (order + 1).astype(np.int32)))
    return tables


def _ids(values: np.ndarray, sorted_values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=np.int32)
    pos = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return np.where(sorted_values[pos] == values, ids[pos], 0).astype(np.int32)


def map_batches(vocab_dir: str) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The per-partition function: lines -> label, log-scaled dense features and category ids."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        tables = _lookup_tables(vocab_dir)
        for batch in batches:
            parsed = parse_lines(batch.column(0))
            out: dict[str, object] = {"label": parsed.label}
            for c, x in zip(DENSE, parsed.dense):
                out[c] = np.log1p(np.maximum(x, 0)).astype(np.float32)
            for j, c in enumerate(SPARSE):
                out[c] = _ids(parsed.sparse[j], *tables[j])
            out["line"] = pa.nulls(len(parsed.label), pa.string())
            yield pa.RecordBatch.from_pydict(out, schema=_MAPPED_ARROW)
            if parsed.rejected:
                yield _rejected_batch(parsed.rejected)

    return run


_MAPPED_ARROW = pa.schema(
    [("label", pa.int8())] + [(c, pa.float32()) for c in DENSE] + [(c, pa.int32()) for c in SPARSE]
    + [("line", pa.string())]
)


def _rejected_batch(lines: list[str]) -> pa.RecordBatch:
    n = len(lines)
    cols = [pa.array(np.zeros(n, np.int8))] + [pa.array(np.zeros(n, np.float32))] * NUM_DENSE
    cols += [pa.array(np.zeros(n, np.int32))] * NUM_SPARSE + [pa.array(lines, pa.string())]
    return pa.RecordBatch.from_arrays(cols, schema=_MAPPED_ARROW)


def write_mapped(spark: SparkSession, files: list[Path], vocab_dir: Path, out: Path) -> None:
    read_lines(spark, files).mapInArrow(map_batches(str(vocab_dir)), MAPPED_SCHEMA).write.parquet(str(out))


def parts(parquet_dir: Path) -> list[Path]:
    """Parquet parts in partition order, which is input order within each file."""
    return sorted(parquet_dir.glob("part-*.parquet"))


def row_accounting(parquet_dir: Path) -> tuple[int, int, list[str]]:
    """(rows written, rows rejected, sample of rejected lines), reading only the ``line`` column."""
    written = rejected = 0
    sample: list[str] = []
    for part in parts(parquet_dir):
        line = pq.read_table(part, columns=["line"]).column("line")
        bad = line.filter(pc.is_valid(line))
        written += len(line) - len(bad)
        rejected += len(bad)
        sample += [t for t in bad.to_pylist()[:REJECT_SAMPLE] if t][: REJECT_SAMPLE - len(sample)]
    return written, rejected, sample


def pack(parquet_dir: Path, splits: dict[str, tuple[int, int]], vocab_sizes: list[int], root: Path) -> None:
    """Stream the written rows of the Parquet parts into ``root/<split>/*.npy``.

    ``splits`` maps split name -> (first row, row count) among the written
    rows, so one day can be cut into the test and validation halves.
    """
    outputs = []
    for split, (start, count) in splits.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        outputs.append((start, count, _open_split(folder, count, vocab_sizes)))
    offset = 0
    for part in parts(parquet_dir):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=1 << 17):
            batch = batch.filter(pc.is_null(batch.column("line")))
            n = batch.num_rows
            for start, count, out in outputs:
                lo, hi = max(offset, start), min(offset + n, start + count)
                if lo < hi:
                    _write_rows(out, batch.slice(lo - offset, hi - lo), lo - start)
            offset += n
    for _, _, out in outputs:
        for array in out.values():
            array.flush()


def _open_split(folder: Path, rows: int, vocab_sizes: list[int]) -> dict[str, np.memmap]:
    def create(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
        return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    out = {"label": create("label", np.dtype(np.uint8), (rows,)),
           "dense": create("dense", np.dtype(np.float32), (rows, NUM_DENSE))}
    for j in range(NUM_SPARSE):
        out[cat_name(j)] = create(cat_name(j), id_dtype(vocab_sizes[j]), (rows,))
    return out


def _write_rows(out: dict[str, np.memmap], batch: pa.RecordBatch, at: int) -> None:
    n = batch.num_rows
    out["label"][at : at + n] = batch.column("label").to_numpy()
    out["dense"][at : at + n] = np.column_stack([batch.column(c).to_numpy() for c in DENSE])
    for j, c in enumerate(SPARSE):
        out[cat_name(j)][at : at + n] = batch.column(c).to_numpy()


def run(
    spark: SparkSession,
    cfg: PreprocessConfig,
    train_files: list[Path],
    eval_files: list[Path],
    out_root: Path,
    progress: Callable[[str], None] = lambda step: None,
) -> dict:
    """Run the whole job; write ``out_root`` (via a temporary folder) and return its manifest."""
    tmp = out_root.with_name(out_root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = tmp / "_scratch"

    progress("count values in training days")
    vocab_sizes = save_vocabularies(vocabularies(spark, train_files, cfg.freq_threshold), scratch, tmp / "vocab")

    progress("map and write training days")
    write_mapped(spark, train_files, tmp / "vocab", scratch / "train")
    train_rows, train_rejected, train_sample = row_accounting(scratch / "train")
    if train_rows == 0:
        raise PreprocessError(
            f"no valid rows in the training days ({train_rejected} read, all rejected; first: {train_sample[:1]}); "
            "check that the files are Criteo TSV with 40 tab-separated fields"
        )

    progress("map and write evaluation day")
    write_mapped(spark, eval_files, tmp / "vocab", scratch / "eval")
    eval_rows, eval_rejected, eval_sample = row_accounting(scratch / "eval")

    progress("pack into memory-mapped arrays")
    test_rows = eval_rows // 2
    pack(scratch / "train", {"train": (0, train_rows)}, vocab_sizes, tmp)
    pack(scratch / "eval", {"test": (0, test_rows), "val": (test_rows, eval_rows - test_rows)}, vocab_sizes, tmp)
    shutil.rmtree(scratch)

    manifest = {
        "format_version": FORMAT_VERSION,
        "rows": {"train": train_rows, "test": test_rows, "val": eval_rows - test_rows},
        "rows_read": {"train": train_rows + train_rejected, "eval": eval_rows + eval_rejected},
        "rows_rejected": {"train": train_rejected, "eval": eval_rejected},
        "rejected_sample": (train_sample + eval_sample)[:REJECT_SAMPLE],
        "vocab_sizes": vocab_sizes,
        "id_dtypes": [str(id_dtype(v)) for v in vocab_sizes],
        "dense_transform": "log(1 + max(x, 0)), missing -> 0, applied in preprocessing",
        "freq_threshold": cfg.freq_threshold,
        "inputs": {"train": [f.name for f in train_files], "eval": [f.name for f in eval_files]},
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    shutil.rmtree(out_root, ignore_errors=True)
    tmp.rename(out_root)
    return manifest


def rows_per_s(manifest: dict, seconds: float) -> float:
    read = sum(manifest["rows_read"].values())
    return read / seconds if seconds > 0 else math.nan
