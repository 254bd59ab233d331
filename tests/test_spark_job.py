"""The Spark job on plain local Spark, checked value by value against a direct computation."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench.config import resolve
from preprocess import spark_job, vocab
from preprocess.layout import ProcessedData, cat_name
from preprocess.ranges import RANGE_BYTES
from tests.conftest import criteo_line, write_day

BIG = "ffffffff"  # 2^32 - 1: above 2^24, so a float32 round trip would corrupt it


def _rows(seed: int, n: int) -> list[tuple[int, list[str], list[str]]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 1000))) for _ in range(13)]
        cats = []
        for j in range(26):
            r = rng.random()
            cats.append("" if r < 0.1 else BIG if r < 0.3 else f"{int(rng.integers(0, 6 + j)) * 16777259:08x}"[-8:])
        rows.append((int(rng.integers(0, 2)), ints, cats))
    return rows


@pytest.fixture(scope="module")
def job(local_spark, tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    train_rows, eval_rows = _rows(1, 400) + _rows(2, 300), _rows(3, 201)
    eval_rows[5][2][0] = "0badcafe"  # unseen in training
    bad = ["1\t2\t3\n", criteo_line(1, ["x"] + [""] * 12, [""] * 26), criteo_line(0, [""] * 13, ["zz"] + [""] * 25)]
    train_files = [write_day(d / "day_0", [criteo_line(*r) for r in train_rows[:400]] + bad[:2]),
                   write_day(d / "day_1", [criteo_line(*r) for r in train_rows[400:]])]
    eval_files = [write_day(d / "day_2", [criteo_line(*r) for r in eval_rows] + bad[2:])]
    cfg = resolve("tiny", ["preprocess.engine=local", "preprocess.freq_threshold=2"]).preprocess
    out = d / "processed"  # out.parent holds the day files
    manifest = spark_job.run(local_spark, cfg, train_files, eval_files, out)
    return manifest, out, train_rows, eval_rows


def _expected_vocab(train_rows, column: int, threshold: int) -> list[int]:
    counts = Counter(int(c[column], 16) for _, _, c in train_rows if c[column])
    kept = [(v, n) for v, n in counts.items() if n >= threshold]
    return [v for v, _ in sorted(kept, key=lambda vn: (-vn[1], vn[0]))]


def test_every_row_is_accounted_for(job):
    manifest, _, train_rows, eval_rows = job
    assert manifest["rows_read"] == {"train": 702, "eval": 202}
    assert manifest["rows_rejected"] == {"train": 2, "eval": 1}
    assert manifest["rows"] == {"train": 700, "test": 100, "val": 101}
    assert len(manifest["rejected_sample"]) == 3


def test_vocabularies_come_from_training_days_in_frequency_order(job):
    manifest, out, train_rows, _ = job
    for j in (0, 7, 25):
        expected = _expected_vocab(train_rows, j, threshold=2)
        assert np.load(out / "vocab" / f"{cat_name(j)}.npy").tolist() == expected
        assert manifest["vocab_sizes"][j] == len(expected) + 1
    # the 2^32-1 value is the most frequent in every column, so it gets id 1, exactly
    assert np.load(out / "vocab" / "cat_03.npy")[0] == 0xFFFFFFFF


def test_ids_and_dense_values_are_exact(job):
    _, out, train_rows, eval_rows = job
    train, test, val = (ProcessedData(out, s) for s in ("train", "test", "val"))
    vocabs = [{v: i + 1 for i, v in enumerate(_expected_vocab(train_rows, j, threshold=2))} for j in range(26)]

    def ids(rows):
        return [tuple(vocabs[j].get(int(c[j], 16), 0) if c[j] else 0 for j in range(26)) for _, _, c in rows]

    # the evaluation day keeps its line order (test = first half); training rows keep file and line order
    assert list(zip(*[np.concatenate([test.cats[j], val.cats[j]]).tolist() for j in range(26)])) == ids(eval_rows)
    assert list(zip(*[train.cats[j].tolist() for j in range(26)])) == ids(train_rows)
    assert test.cats[0][5] == 0  # unseen value -> 0
    dense = np.concatenate([test.dense, val.dense])
    want = np.array([[math.log1p(max(int(x), 0)) if x else 0.0 for x in ints] for _, ints, _ in eval_rows], np.float32)
    np.testing.assert_allclose(dense, want, rtol=1e-6)
    assert np.concatenate([test.label, val.label]).tolist() == [lab for lab, _, _ in eval_rows]
    assert train.label.tolist() == [lab for lab, _, _ in train_rows]


def test_ids_use_the_narrowest_unsigned_type(job):
    manifest, out, _, _ = job
    test = ProcessedData(out, "test")
    assert all(a.dtype == np.uint8 for a in test.cats)
    assert manifest["id_dtypes"] == ["uint8"] * 26
    assert json.loads((out / "manifest.json").read_text())["vocab_sizes"] == manifest["vocab_sizes"]


def test_no_valid_training_rows_is_a_clear_error(local_spark, tmp_path):
    day = write_day(tmp_path / "day_0", ["a\tb\n"] * 5)
    cfg = resolve("tiny", ["preprocess.engine=local"]).preprocess
    with pytest.raises(spark_job.PreprocessError, match="no valid rows"):
        spark_job.run(local_spark, cfg, [day], [day], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- output identity, accounting, options -----------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_records_every_output_file(job):
    manifest, out, _, _ = job
    files = manifest["files"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert sorted(files) == on_disk and len(on_disk) == 3 * 28 + 26
    for name, info in files.items():
        array = np.load(out / name, mmap_mode="r")
        assert info == {"sha256": _sha256(out / name), "shape": list(array.shape), "dtype": str(array.dtype)}
    assert files["train/dense.npy"]["shape"] == [700, 13]


def test_oov_rows_and_columns_are_counted(job):
    manifest, _, train_rows, eval_rows = job
    vocabs = [set(_expected_vocab(train_rows, j, threshold=2)) for j in range(26)]
    oov = [[bool(c[j]) and int(c[j], 16) not in vocabs[j] for j in range(26)] for _, _, c in eval_rows]
    halves = {"test": oov[:100], "val": oov[100:]}
    assert manifest["oov_rows"] == {s: sum(any(r) for r in rows) for s, rows in halves.items()}
    assert manifest["oov_per_column"] == {s: [sum(r[j] for r in rows) for j in range(26)] for s, rows in halves.items()}
    assert manifest["oov_per_column"]["test"][0] >= 1  # the unseen 0badcafe


def test_peak_memory_and_step_times_are_recorded(job):
    timing = job[0]["timing"]
    assert set(timing["steps_seconds"]) == {"parse_and_count", "vocabularies", "map_and_write", "checksums"}
    assert timing["job_seconds"] >= sum(timing["steps_seconds"].values()) - 0.01
    assert timing["cores"] == 2  # the tiny profile: 2 executors x 1 core
    assert timing["rows_per_s"] == pytest.approx(904 / timing["job_seconds"], rel=0.01)
    assert timing["rows_per_s_per_core"] == pytest.approx(timing["rows_per_s"] / 2, rel=0.01)
    assert timing["peak_rss_bytes"]["driver"] > 50 << 20  # this process and the JVM
    assert timing["peak_rss_bytes"]["executors"] > 10 << 20  # Spark's Python workers


def _job_in_subprocess(raw: Path, out: Path, scratch: Path, cores: int, range_bytes: int) -> dict:
    """The job in a fresh local[cores] Spark (one JVM per process holds one session)."""
    code = f"""
import json, sys
from pathlib import Path
from bench import cluster
from bench.config import resolve
from preprocess import spark_job
cfg = resolve("tiny", ["preprocess.engine=local", "preprocess.executors=1", "preprocess.executor_cores={cores}"])
with cluster.spark_session(cfg.preprocess, Path({str(scratch)!r})) as spark:
    m = spark_job.run(spark, cfg.preprocess, [Path({str(raw / "day_0")!r}), Path({str(raw / "day_1")!r})],
                      [Path({str(raw / "day_2")!r})], Path({str(out)!r}), range_bytes={range_bytes})
print("MANIFEST" + json.dumps(m))
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("MANIFEST", 1)[1])


def test_output_is_byte_identical_whatever_the_cores_and_splits(job, local_spark, tmp_path):
    manifest, out, _, _ = job
    raw = out.parent
    cfg = resolve("tiny", ["preprocess.engine=local", "preprocess.freq_threshold=2"]).preprocess
    # local[2] with ranges of 9973 bytes: lines cut mid-way, dozens of ranges
    small = spark_job.run(local_spark, cfg, [raw / "day_0", raw / "day_1"], [raw / "day_2"], tmp_path / "small",
                          range_bytes=9973)
    assert small["timing"]["input_ranges"] == 25
    # local[1] in its own JVM, ranges of 1 MB: one task per file
    one = _job_in_subprocess(raw, tmp_path / "one", tmp_path / "scratch", cores=1, range_bytes=1 << 20)
    assert one["timing"]["input_ranges"] == 3
    assert small["files"] == manifest["files"] == one["files"]
    for name, info in manifest["files"].items():
        assert _sha256(tmp_path / "small" / name) == _sha256(tmp_path / "one" / name) == info["sha256"]


def test_max_ind_range_hashes_values_before_counting(job, local_spark, tmp_path):
    _, out, train_rows, eval_rows = job
    raw = out.parent
    m = 7
    cfg = resolve("tiny", ["preprocess.engine=local", "preprocess.freq_threshold=2", f"preprocess.max_ind_range={m}"]
                  ).preprocess
    manifest = spark_job.run(local_spark, cfg, [raw / "day_0", raw / "day_1"], [raw / "day_2"], tmp_path / "out")
    hashed = [(lab, ints, [f"{int(c, 16) % m:08x}" if c else "" for c in cats]) for lab, ints, cats in train_rows]
    for j in (0, 3, 25):
        expected = _expected_vocab(hashed, j, threshold=2)
        assert np.load(tmp_path / "out" / "vocab" / f"{cat_name(j)}.npy").tolist() == expected
        assert max(expected) < m and manifest["vocab_sizes"][j] == len(expected) + 1
    vocab = {v: i + 1 for i, v in enumerate(_expected_vocab(hashed, 0, threshold=2))}
    test = ProcessedData(tmp_path / "out", "test")
    assert test.cats[0].tolist() == [vocab.get(int(c[0], 16) % m, 0) if c[0] else 0 for _, _, c in eval_rows[:100]]
    assert manifest["max_ind_range"] == m


def test_direct_and_hashed_lookup_tables_write_the_same_bytes(job, local_spark, tmp_path, monkeypatch):
    _, out, _, _ = job
    raw = out.parent
    cfg = resolve("tiny", ["preprocess.engine=local", "preprocess.freq_threshold=2",
                           "preprocess.max_ind_range=1000003"]).preprocess
    days = ([raw / "day_0", raw / "day_1"], [raw / "day_2"])
    direct = spark_job.run(local_spark, cfg, *days, tmp_path / "direct")  # values below 1000003: direct tables
    monkeypatch.setattr(vocab, "DIRECT_MAX", 0)  # the driver picks the kind of table and tells the map tasks
    hashed = spark_job.run(local_spark, cfg, *days, tmp_path / "hashed")
    assert direct["files"] == hashed["files"]
    assert direct["oov_per_column"] == hashed["oov_per_column"] and sum(direct["oov_per_column"]["test"]) > 0
    assert direct["vocab_sizes"][0] > 2


@pytest.mark.parametrize("range_bytes", [RANGE_BYTES, 9973])  # a gzip day in one chunk, or in many
def test_gzip_days_read_like_plain_ones(job, local_spark, tmp_path, range_bytes):
    manifest, out, _, _ = job
    raw = out.parent
    for day in ("day_0", "day_2"):
        (tmp_path / f"{day}.gz").write_bytes(gzip.compress((raw / day).read_bytes()))
    cfg = resolve("tiny", ["preprocess.engine=local", "preprocess.freq_threshold=2"]).preprocess
    again = spark_job.run(local_spark, cfg, [tmp_path / "day_0.gz", raw / "day_1"], [tmp_path / "day_2.gz"],
                          tmp_path / "out", range_bytes=range_bytes)
    assert again["files"] == manifest["files"]
    assert again["rows_rejected"] == manifest["rows_rejected"]
    assert again["oov_rows"] == manifest["oov_rows"]


def test_truncated_gzip_is_a_one_line_error_naming_the_file(local_spark, tmp_path):
    lines = "".join(criteo_line(*r) for r in _rows(4, 300)).encode()
    gz = tmp_path / "day_0.gz"
    gz.write_bytes(gzip.compress(lines)[:-40])
    cfg = resolve("tiny", ["preprocess.engine=local"]).preprocess
    with pytest.raises(spark_job.PreprocessError) as err:
        spark_job.run(local_spark, cfg, [gz], [gz], tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and str(gz) in message and "truncated gzip" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_parse_floor_is_a_rate(tmp_path):
    day = write_day(tmp_path / "day_0", [criteo_line(*r) for r in _rows(7, 500)] + ["bad line\n"])
    assert spark_job.parse_floor_rows_per_s([day]) > 1000
    assert spark_job.parse_floor_rows_per_s([day], max_bytes=5000) > 100


def test_warm_up_runs_the_job_and_leaves_nothing(local_spark, tmp_path):
    cfg = resolve("tiny", ["preprocess.engine=local"]).preprocess
    assert spark_job.warm_up(local_spark, cfg, tmp_path / "warm") > 0
    assert not (tmp_path / "warm").exists()


def test_missing_input_is_a_clear_error(local_spark, tmp_path):
    cfg = resolve("tiny", ["preprocess.engine=local"]).preprocess
    with pytest.raises(spark_job.PreprocessError, match="missing input file .*day_9"):
        spark_job.run(local_spark, cfg, [tmp_path / "day_9"], [tmp_path / "day_9"], tmp_path / "out")
