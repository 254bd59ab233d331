"""The Spark preprocessing job: Criteo TSV days -> the training-ready layout.

Steps, all on the executors (nothing but small counts comes back to the driver):
1. parse each line in the JVM: split on tabs, check the shape of every field,
   keep valid rows and count the rejected ones (a sample is kept);
2. count every (column, value) over the training days only and number the
   values seen at least ``freq_threshold`` times 1, 2, ... by descending count
   (id 0 is missing, rare or unseen);
3. map values to ids with a vectorised lookup (``mapInArrow``) against the
   vocabularies written as sorted arrays, and write Parquet;
4. pack the Parquet parts into the memory-mappable arrays the loader reads.

Category values are parsed from hex to int64 in the JVM and ids are integers
throughout: nothing passes through a float.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from bench.config import NUM_DENSE, NUM_SPARSE, PreprocessConfig
from bench.fsutil import atomic_write_json
from preprocess.layout import FORMAT_VERSION, MANIFEST, cat_name, id_dtype

NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
DENSE = [f"i{j}" for j in range(NUM_DENSE)]
SPARSE = [f"c{j}" for j in range(NUM_SPARSE)]
REJECT_SAMPLE = 20

# The schema the parsed rows have; an explicit schema, not inferred.
PARSED_SCHEMA = T.StructType(
    [T.StructField("label", T.ByteType(), False)]
    + [T.StructField(c, T.LongType(), True) for c in DENSE]
    + [T.StructField(c, T.LongType(), True) for c in SPARSE]
)
MAPPED_SCHEMA = T.StructType(
    [T.StructField("label", T.ByteType(), False)]
    + [T.StructField(c, T.FloatType(), False) for c in DENSE]
    + [T.StructField(c, T.IntegerType(), False) for c in SPARSE]
)


class PreprocessError(RuntimeError):
    """Input the job cannot use, reported to the user as one line."""


def parse(spark: SparkSession, files: list[Path]) -> DataFrame:
    """Lines -> typed rows plus a ``valid`` flag, entirely in the JVM."""
    lines = spark.read.text([str(f) for f in files])
    fields = F.split(F.col("value"), "\t", -1)
    field = [fields.getItem(j) for j in range(NUM_FIELDS)]
    valid = (F.size(fields) == NUM_FIELDS) & field[0].isin("0", "1")
    for j in range(1, 1 + NUM_DENSE):
        valid = valid & field[j].rlike(r"^(-?[0-9]{1,18})?$")
    for j in range(1 + NUM_DENSE, NUM_FIELDS):
        valid = valid & field[j].rlike(r"^([0-9a-fA-F]{1,8})?$")

    def nullable(text, value):
        return F.when(text == "", F.lit(None)).otherwise(value)

    columns = [field[0].cast("byte").alias("label")]
    columns += [nullable(field[1 + j], field[1 + j].cast("long")).alias(c) for j, c in enumerate(DENSE)]
    columns += [
        nullable(field[1 + NUM_DENSE + j], F.conv(field[1 + NUM_DENSE + j], 16, 10).cast("long")).alias(c)
        for j, c in enumerate(SPARSE)
    ]
    return lines.select(F.coalesce(valid, F.lit(False)).alias("valid"), F.col("value"), *columns)


def vocabularies(train: DataFrame, freq_threshold: int) -> DataFrame:
    """(column, value, id) for values seen at least ``freq_threshold`` times in training."""
    stacked = train.select(
        F.explode(F.array(*[F.struct(F.lit(j).alias("column"), F.col(c).alias("value")) for j, c in enumerate(SPARSE)]))
    ).select("col.column", "col.value")
    counts = stacked.where(F.col("value").isNotNull()).groupBy("column", "value").count()
    kept = counts.where(F.col("count") >= max(freq_threshold, 1))
    # Hot values get small ids, so the rows touched most sit together in the table.
    order = Window.partitionBy("column").orderBy(F.col("count").desc(), F.col("value").asc())
    return kept.withColumn("id", F.row_number().over(order))


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


def _lookup_tables(vocab_dir: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per column: values sorted ascending, and the id of each."""
    tables = []
    for j in range(NUM_SPARSE):
        by_id = np.load(f"{vocab_dir}/{cat_name(j)}.npy")
        order = np.argsort(by_id, kind="stable")
        tables.append((by_id[order], (order + 1).astype(np.int32)))
    return tables


def map_batches(vocab_dir: str) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The per-partition function: raw typed columns -> dense floats and category ids."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        tables = _lookup_tables(vocab_dir)
        for batch in batches:
            out = {"label": batch.column("label")}
            for c in DENSE:
                x = batch.column(c).to_numpy(zero_copy_only=False)
                x = np.nan_to_num(x, nan=0.0)  # missing -> 0, as the reference does
                out[c] = pa.array(np.log1p(np.maximum(x, 0.0)).astype(np.float32))
            for j, c in enumerate(SPARSE):
                out[c] = pa.array(_ids(batch.column(c), *tables[j]))
            yield pa.RecordBatch.from_pydict(out)

    return run


def _ids(column: pa.Array, sorted_values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    values = column.fill_null(-1).to_numpy()
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=np.int32)
    pos = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return np.where(sorted_values[pos] == values, ids[pos], 0).astype(np.int32)


def pack(parquet_dir: Path, out_dirs: dict[str, tuple[int, int]], vocab_sizes: list[int], root: Path) -> None:
    """Stream Parquet parts (in part order) into ``root/<split>/*.npy``.

    ``out_dirs`` maps split name -> (first row, row count) within the parquet rows,
    so one day can be cut into the test and validation halves.
    """
    parts = sorted(parquet_dir.glob("part-*.parquet"))
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    arrays = {}
    for split, (start, count) in out_dirs.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        arrays[split] = (start, count, _open_split(folder, count, vocab_sizes))
    offset = 0
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=65536):
            n = batch.num_rows
            for start, count, out in arrays.values():
                lo, hi = max(offset, start), min(offset + n, start + count)
                if lo < hi:
                    _write_rows(out, batch.slice(lo - offset, hi - lo), lo - start)
            offset += n
    assert offset == total
    for _, _, out in arrays.values():
        for array in out.values():
            array.flush()


def _open_split(folder: Path, rows: int, vocab_sizes: list[int]) -> dict[str, np.memmap]:
    def create(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
        return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    out = {"label": create("label", np.dtype(np.uint8), (rows,)), "dense": create("dense", np.dtype(np.float32), (rows, NUM_DENSE))}
    for j in range(NUM_SPARSE):
        out[cat_name(j)] = create(cat_name(j), id_dtype(vocab_sizes[j]), (rows,))
    return out


def _write_rows(out: dict[str, np.memmap], batch: pa.RecordBatch, at: int) -> None:
    n = batch.num_rows
    out["label"][at : at + n] = batch.column("label").to_numpy()
    out["dense"][at : at + n] = np.column_stack([batch.column(c).to_numpy() for c in DENSE])
    for j, c in enumerate(SPARSE):
        out[cat_name(j)][at : at + n] = batch.column(c).to_numpy()


def _count(parsed: DataFrame) -> tuple[int, int, list[str]]:
    counts = {row["valid"]: row["count"] for row in parsed.groupBy("valid").count().collect()}
    sample = [row["value"][:500] for row in parsed.where(~F.col("valid")).select("value").limit(REJECT_SAMPLE).collect()]
    return counts.get(True, 0) + counts.get(False, 0), counts.get(False, 0), sample


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

    progress("parse and check training days")
    train = parse(spark, train_files).persist(StorageLevel.MEMORY_AND_DISK)
    train_read, train_rejected, train_sample = _count(train)
    if train_read == train_rejected:
        raise PreprocessError(
            f"no valid rows in the training days ({train_read} read, all rejected; first: {train_sample[:1]}); "
            "check that the files are Criteo TSV with 40 tab-separated fields"
        )
    train_ok = train.where("valid")

    progress("build vocabularies from training days")
    vocab_sizes = save_vocabularies(vocabularies(train_ok, cfg.freq_threshold), scratch, tmp / "vocab")
    mapper = map_batches(str(tmp / "vocab"))

    progress("map and write training days")
    train_ok.select(*PARSED_SCHEMA.names).mapInArrow(mapper, MAPPED_SCHEMA).write.parquet(str(scratch / "train"))
    train.unpersist()

    progress("parse, map and write evaluation day")
    evaluation = parse(spark, eval_files).persist(StorageLevel.MEMORY_AND_DISK)
    eval_read, eval_rejected, eval_sample = _count(evaluation)
    evaluation.where("valid").select(*PARSED_SCHEMA.names).mapInArrow(mapper, MAPPED_SCHEMA).write.parquet(
        str(scratch / "eval")
    )
    evaluation.unpersist()

    progress("pack into memory-mapped arrays")
    train_rows = train_read - train_rejected
    eval_rows = eval_read - eval_rejected
    test_rows = eval_rows // 2
    pack(scratch / "train", {"train": (0, train_rows)}, vocab_sizes, tmp)
    pack(scratch / "eval", {"test": (0, test_rows), "val": (test_rows, eval_rows - test_rows)}, vocab_sizes, tmp)
    shutil.rmtree(scratch)

    manifest = {
        "format_version": FORMAT_VERSION,
        "rows": {"train": train_rows, "test": test_rows, "val": eval_rows - test_rows},
        "rows_read": {"train": train_read, "eval": eval_read},
        "rows_rejected": {"train": train_rejected, "eval": eval_rejected},
        "rejected_sample": train_sample + eval_sample,
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
