"""Data micro-benchmarks: the synthetic generator, the Spark preprocessing job, the loader.

The preprocessing job runs on plain local Spark with the small profile's cores (2 executors x 1
core), warmed up first, on generated synthetic days at two sizes: its rows/s are set against the
parse floor (Arrow's CSV reader alone on the same files), and its peak memory at the two sizes
shows whether memory stays bounded as the data grows. The loader reads a processed dataset the job
wrote, as one rank of the small profile does.

This module runs before bench_model (file order): the job's driver memory includes this process,
which should not yet hold the model benchmarks' tables.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import cluster
from bench.config import Config, DataConfig, resolve
from dlrm import data
from preprocess import spark_job, synthetic
from preprocess.layout import ProcessedData, day_file
from throughput import rates, record

# Rows the preprocessing job reads, half in a training day and half in an evaluation day.
SIZES = (100_000, 400_000)
ROUNDS = 3  # of the calls that take seconds (generation, the job)
GENERATED_ROWS_PER_DAY = 250_000  # the generator writes this day and an evaluation day: 500k rows per call

Days = tuple[list[Path], list[Path]]  # training files, evaluation files


def data_config(folder: Path, rows_per_day: int) -> DataConfig:
    """The small profile's synthetic data (its cardinalities and click model), one training day."""
    return resolve("small", ["data.days=1", f"data.rows_per_day={rows_per_day}", f"data.dir={folder}"]).data


@pytest.fixture(scope="module")
def days(scratch: Path) -> Callable[[int], Days]:
    """Generated day files holding ``rows`` rows in all, made once per size."""
    made: dict[int, Days] = {}

    def get(rows: int) -> Days:
        if rows not in made:
            folder = scratch / f"raw-{rows}"
            synthetic.generate(data_config(folder, rows // 2), folder, workers=os.cpu_count() or 1)
            made[rows] = [day_file(folder, 0)], [day_file(folder, 1)]
        return made[rows]

    return get


@pytest.fixture(scope="module")
def spark(small: Config, scratch: Path) -> Iterator[object]:
    """Local Spark with the small profile's executors, past its first-job warm-up; stopped at the end."""
    os.environ.update(cluster.engine_environment(dict(os.environ)))
    with cluster.spark_session(small.preprocess, scratch / "spark-scratch") as session:
        spark_job.warm_up(session, small.preprocess, scratch / "spark-warmup")
        yield session


def test_synthetic_generation(benchmark, scratch):
    """Rows/s of Criteo TSV written by one process, model building and calibration included."""
    folder = scratch / "generated"
    cfg = data_config(folder, GENERATED_ROWS_PER_DAY)
    cpu_seconds: list[float] = []

    def generate() -> dict:
        shutil.rmtree(folder, ignore_errors=True)
        start = time.process_time()  # all threads of this process (Arrow's CSV writer may use several)
        manifest = synthetic.generate(cfg, folder, workers=1)
        cpu_seconds.append(time.process_time() - start)
        return manifest

    manifest = benchmark.pedantic(generate, rounds=ROUNDS, iterations=1)
    rows = (cfg.days + 1) * cfg.rows_per_day
    got = rates(benchmark, {"rows": rows, "bytes": sum(manifest["files"].values())})
    # One worker: the rate is per core as long as the process kept to one core (cpu seconds say so).
    record(benchmark, {**got, "rows_per_cpu_s": rows / min(cpu_seconds)})
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("rows", SIZES, ids=lambda rows: f"{rows // 1000}k_rows")
def test_preprocess(benchmark, spark, small, days, rows, scratch):
    """The whole job on a fixed input: rows/s (and per core), x of the parse floor, peak memory."""
    train_files, eval_files = days(rows)
    out = scratch / f"processed-{rows}"
    manifests: list[dict] = []

    def job() -> None:
        manifests.append(spark_job.run(spark, small.preprocess, train_files, eval_files, out))

    benchmark.pedantic(job, rounds=ROUNDS, iterations=1)
    assert sum(manifests[-1]["rows_read"].values()) == rows  # every generated row was read
    files = train_files + eval_files
    got = rates(benchmark, {"rows": rows, "bytes": sum(f.stat().st_size for f in files)})
    # An in-run reference, so its best of a few (the first call also starts Arrow's threads); measured
    # after the job, when Spark has let go of the cores.
    floor = max(spark_job.parse_floor_rows_per_s(files) for _ in range(ROUNDS))
    cores = small.preprocess.executors * small.preprocess.executor_cores
    peak = {kind: max(m["timing"]["peak_rss_bytes"][kind] for m in manifests) for kind in ("driver", "executors")}
    record(benchmark, {**got, "rows_per_s_per_core": got["rows_per_s"] / cores, "parse_floor_rows_per_s": floor,
                       "x_of_parse_floor": floor / got["rows_per_s"],
                       "peak_rss_driver_bytes": peak["driver"], "peak_rss_executors_bytes": peak["executors"]})
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def processed(spark, small: Config, days, scratch: Path) -> Path:
    """The larger input, preprocessed."""
    out = scratch / "processed-loader"
    spark_job.run(spark, small.preprocess, *days(SIZES[-1]), out)
    return out


def test_loader(benchmark, small, processed):
    """One epoch of rank 0's training batches (global batch 2048 over 2 ranks) from the memory-mapped split."""
    split = ProcessedData(processed, "train")

    def epoch() -> tuple[int, int]:
        samples = nbytes = 0
        for batch in data.train_batches(split, small.train.batch_size, 0, small.world_size):
            samples += len(batch.labels)
            nbytes += sum(t.nbytes for t in batch)
        return samples, nbytes

    samples, nbytes = epoch()  # pages the split into the page cache, as training's first epoch would
    assert samples == len(split) // small.train.batch_size * small.train.batch_size // small.world_size
    benchmark(epoch)
    record(benchmark, rates(benchmark, {"samples": samples, "batch_bytes": nbytes}))
