"""The synthetic generator: exact Criteo format, determinism, and the ground truth it claims."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from bench.config import NUM_DENSE, NUM_SPARSE, DataConfig, resolve
from preprocess import synthetic
from preprocess.layout import DATASET_MANIFEST

ROWS = 4000
INT_FIELD = re.compile(r"-?\d+|")
HEX_FIELD = re.compile(r"[0-9a-f]{8}|")


def small_config(seed: int = 0, **overrides: object) -> DataConfig:
    settings = {"data.rows_per_day": ROWS, "data.seed": seed, "data.synthetic.max_cardinality": 500, **overrides}
    return resolve("tiny", [f"{k}={v}" for k, v in settings.items()]).data


def read_fields(path: Path) -> list[list[str]]:
    text = path.read_text()
    assert text.endswith("\n")
    return [line.split("\t") for line in text[:-1].split("\n")]


def columns(rows: list[list[str]]) -> list[np.ndarray]:
    """The 40 fields as columns of strings."""
    return list(np.array(rows, dtype=object).T)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[DataConfig, Path, dict]:
    cfg = small_config()
    raw = tmp_path_factory.mktemp("raw")
    return cfg, raw, synthetic.generate(cfg, raw, workers=1)


def test_every_line_has_criteos_40_fields(generated):
    cfg, raw, _ = generated
    for day in range(cfg.days + 1):
        rows = read_fields(raw / f"day_{day}")
        assert len(rows) == cfg.rows_per_day
        for fields in rows:
            assert len(fields) == 1 + NUM_DENSE + NUM_SPARSE
            assert fields[0] in ("0", "1")
            assert all(INT_FIELD.fullmatch(f) for f in fields[1 : 1 + NUM_DENSE]), fields
            assert all(HEX_FIELD.fullmatch(f) for f in fields[1 + NUM_DENSE :]), fields


def test_manifest_describes_the_files(generated):
    cfg, raw, manifest = generated
    assert json.loads((raw / DATASET_MANIFEST).read_text()) == manifest
    assert manifest["source"] == "synthetic" and manifest["format"] == "criteo-tsv"
    assert manifest["train_days"] == [0, 1] and manifest["eval_day"] == 2
    assert manifest["rows_per_day"] == ROWS and manifest["seed"] == 0
    assert manifest["files"] == {f"day_{d}": (raw / f"day_{d}").stat().st_size for d in range(3)}
    assert manifest["generator"] == {**cfg.synthetic.model_dump(mode="json"), "version": synthetic.GENERATOR_VERSION}
    assert sorted(p.name for p in raw.iterdir()) == [DATASET_MANIFEST, "day_0", "day_1", "day_2"]
    assert all((raw / f"day_{d}").stat().st_mode & 0o777 == 0o644 for d in range(3))  # readable by all


def test_click_rate_is_the_target_and_the_reported_one(generated):
    cfg, raw, manifest = generated
    labels = np.concatenate([columns(read_fields(raw / f"day_{d}"))[0].astype(int) for d in manifest["train_days"]])
    assert manifest["click_rate"] == pytest.approx(labels.mean(), abs=1e-12)
    # 8000 Bernoulli draws: the standard error is 0.005.
    assert labels.mean() == pytest.approx(cfg.synthetic.click_rate, abs=0.02)


def test_oracle_auc_matches_a_recomputation_from_the_file(generated):
    cfg, raw, manifest = generated
    model = synthetic.build_model(cfg)
    fields = columns(read_fields(raw / f"day_{manifest['eval_day']}"))
    labels = fields[0].astype(int)
    ints = np.array([[int(v) if v else -1 for v in col] for col in fields[1 : 1 + NUM_DENSE]])
    # What preprocessing computes: log1p of the non-negative part, 0 for missing (here -1).
    dense = np.log1p(np.maximum(ints, 0)).astype(np.float32)
    ranks = np.empty((NUM_SPARSE, len(labels)), dtype=np.int64)
    for c, col in enumerate(fields[1 + NUM_DENSE :]):
        rank_of = {token.decode(): r for r, token in enumerate(model.token_strings(c))}
        ranks[c] = [rank_of[v] if v else -1 for v in col]
    p = model.probability(ranks, dense)
    half = len(labels) // 2
    oracle = manifest["oracle_auc"]
    assert oracle["test"] == pytest.approx(roc_auc_score(labels[:half], p[:half]), abs=1e-4)
    assert oracle["val"] == pytest.approx(roc_auc_score(labels[half:], p[half:]), abs=1e-4)
    assert oracle["eval_day"] == pytest.approx(roc_auc_score(labels, p), abs=1e-4)
    assert 0.75 < oracle["eval_day"] < 0.9
    # The probabilities are calibrated: as many clicks as they predict.
    assert labels.mean() == pytest.approx(p.mean(), abs=0.02)


def test_cardinalities_are_proportional_to_criteos_and_capped():
    real = synthetic.CRITEO_CARDINALITIES
    cards = synthetic.cardinalities(200_000)
    assert max(cards) == 200_000 and cards[real.index(max(real))] == 200_000
    for r, k in zip(real, cards):
        assert k == max(round(r * 200_000 / max(real)), min(r, 10))
    assert cards[5] == 3 and cards[16] == 4  # small real columns keep their size
    assert synthetic.cardinalities(5) == [min(5, r) for r in real]  # the cap wins over the floor of 10


def test_values_are_distinct_tokens_with_power_law_frequencies(generated):
    cfg, raw, manifest = generated
    model = synthetic.build_model(cfg)
    assert manifest["cardinalities"] == synthetic.cardinalities(cfg.synthetic.max_cardinality)
    train = [columns(read_fields(raw / f"day_{d}")) for d in manifest["train_days"]]
    for c, card in enumerate(manifest["cardinalities"]):
        tokens = {t.decode() for t in model.token_strings(c)}
        assert len(tokens) == card
        seen = np.concatenate([fields[1 + NUM_DENSE + c] for fields in train])
        present = seen[seen != ""]
        assert set(present) <= tokens
        values, counts = np.unique(present, return_counts=True)
        # The top value's share is the power law's P(rank 0); 8000 rows give +-0.015.
        top = synthetic.rank_probabilities(card, cfg.synthetic.zipf_exponent)[0]
        assert counts.max() / len(present) == pytest.approx(top, abs=0.03), c
    assert synthetic.rank_probabilities(1000, 1.2).sum() == pytest.approx(1.0)


def test_missing_rates_and_integer_shapes_are_criteo_like(generated):
    cfg, raw, _ = generated
    fields = columns(read_fields(raw / "day_0"))
    cat_missing = [np.mean(col == "") for col in fields[1 + NUM_DENSE :]]
    assert cat_missing == pytest.approx(synthetic.CAT_MISSING, abs=0.03)
    assert cat_missing[0] == 0 and cat_missing[21] > 0.7
    dense_missing = [np.mean(col == "") for col in fields[1 : 1 + NUM_DENSE]]
    assert dense_missing == pytest.approx([shape[0] for shape in synthetic.DENSE_SHAPE], abs=0.03)
    i2 = fields[2].astype(int)
    assert set(i2[i2 < 0]) == {-1, -2, -3}
    assert np.mean(i2 == -1) == pytest.approx(0.088, abs=0.02)
    present = np.concatenate([col[col != ""].astype(int) for col in fields[1 : 1 + NUM_DENSE]])
    assert np.mean(present == 0) > 0.1 and present.max() > 100_000  # zeros common, heavy tails


def test_same_seed_gives_the_same_bytes_whatever_the_workers(generated, tmp_path):
    cfg, raw, manifest = generated
    assert synthetic.generate(cfg, tmp_path / "two", workers=2) == manifest
    for day in range(cfg.days + 1):
        assert (tmp_path / "two" / f"day_{day}").read_bytes() == (raw / f"day_{day}").read_bytes()
    other = synthetic.generate(small_config(seed=1), tmp_path / "other", workers=1)
    assert other["oracle_auc"] != manifest["oracle_auc"]
    assert (tmp_path / "other" / "day_0").read_bytes() != (raw / "day_0").read_bytes()


def test_chunks_are_reported_as_they_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ROWS", 1000)
    cfg = small_config(**{"data.rows_per_day": 2500, "data.days": 1})
    reported: list[int] = []
    synthetic.generate(cfg, tmp_path, workers=1, progress=reported.append)
    assert reported == [1000, 1000, 500] * 2
    assert [len(read_fields(tmp_path / f"day_{d}")) for d in (0, 1)] == [2500, 2500]


def test_a_failed_run_leaves_no_partial_file_or_stale_manifest(tmp_path):
    (tmp_path / DATASET_MANIFEST).write_text("{}")

    def fail(rows: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(small_config(), tmp_path, workers=1, progress=fail)
    assert list(tmp_path.iterdir()) == []


def test_a_day_failing_in_a_worker_raises_its_error(tmp_path):
    (tmp_path / "day_1").mkdir()  # the finished day_1 cannot be renamed over a directory
    (tmp_path / "day_1" / "keep").touch()
    with pytest.raises(IsADirectoryError):
        synthetic.generate(small_config(**{"data.rows_per_day": 500}), tmp_path, workers=2)
    # Days already running finish; none is left half-written, and there is no manifest.
    assert {p.name for p in tmp_path.iterdir()} <= {"day_0", "day_1", "day_2"}


def test_lines_are_the_fields_joined_whatever_the_values(generated):
    """The vectorised line writer against plain Python formatting: integers of every sign and length
    (past its lookup table, longer than its 8-byte words, int64's extremes), any field missing."""
    cfg, _, _ = generated
    model = synthetic.build_model(cfg)
    rng = np.random.default_rng(0)
    rows = 3000
    int64 = np.iinfo(np.int64)
    edges = np.array([0, 9, 10, -1, -3, -999, -1000, 99_999, 100_000, 12_345_678, 99_999_999, 100_000_000,
                      -10_000_000, int64.max, int64.min])
    shape = (NUM_DENSE, rows)
    spread = rng.integers(-(10**12), 10**12, shape) // 10 ** rng.integers(0, 12, shape)  # 1 to 13 characters
    values = np.where(rng.random(shape) < 0.5, rng.choice(edges, shape), spread)
    missing = rng.random(shape) < 0.3
    ranks = np.stack([rng.integers(0, card, rows) for card in model.cardinalities])
    ranks[rng.random(ranks.shape) < 0.3] = -1
    ranks[:, :2], missing[:, :2] = -1, True  # rows with every field empty
    labels = rng.integers(0, 2, rows).astype(np.int8)

    got = synthetic._tsv_lines(synthetic._RowFormat.of(model), labels, values, missing, ranks).tobytes()
    tokens = [[t.decode() for t in model.token_strings(c)] for c in range(NUM_SPARSE)]
    expected = "".join(
        "\t".join([str(labels[r])] + ["" if missing[j, r] else str(values[j, r]) for j in range(NUM_DENSE)]
                  + ["" if ranks[c, r] < 0 else tokens[c][ranks[c, r]] for c in range(NUM_SPARSE)]) + "\n"
        for r in range(rows)
    )
    assert got.decode() == expected
    assert any(len(str(v)) > 8 for v in values[~missing])  # the longest integers were written


def test_the_click_model_does_not_depend_on_the_blas_threads(generated):
    """OpenBLAS rounds the rows where it splits a matrix-vector product between threads differently,
    which would make the data depend on the number of cores."""
    cfg, _, _ = generated
    model = synthetic.build_model(cfg)
    rows = synthetic.CHUNK_ROWS
    rng = np.random.default_rng(0)
    ranks = synthetic._sample_ranks(rng, rows, model.cardinalities, model.exponent)
    dense = synthetic._dense_log(*synthetic._sample_dense(rng, rows))
    with threadpool_limits(1, user_api="blas"):
        one = model.parts(ranks, dense)
    with threadpool_limits(2, user_api="blas"):
        two = model.parts(ranks, dense)
    assert all(np.array_equal(one[k], two[k]) for k in ("values", "interactions", "dense"))
