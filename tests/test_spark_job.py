"""The Spark job on plain local Spark, checked value by value against a direct computation."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from bench.config import resolve
from preprocess import spark_job
from preprocess.layout import ProcessedData, cat_name
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
    out = d.parent / "processed"
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

    # the evaluation day keeps its line order (test = first half); training days may be read in any file order
    assert list(zip(*[np.concatenate([test.cats[j], val.cats[j]]).tolist() for j in range(26)])) == ids(eval_rows)
    assert sorted(zip(*[train.cats[j].tolist() for j in range(26)])) == sorted(ids(train_rows))
    assert test.cats[0][5] == 0  # unseen value -> 0
    dense = np.concatenate([test.dense, val.dense])
    want = np.array([[math.log1p(max(int(x), 0)) if x else 0.0 for x in ints] for _, ints, _ in eval_rows], np.float32)
    np.testing.assert_allclose(dense, want, rtol=1e-6)
    assert np.concatenate([test.label, val.label]).tolist() == [lab for lab, _, _ in eval_rows]
    assert sorted(train.label.tolist()) == sorted(lab for lab, _, _ in train_rows)


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
