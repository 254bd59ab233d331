"""What the entry points report: metrics, the inference plan and summary, failures."""

import numpy as np
import pytest

from dlrm import runner
from dlrm.inference import plan, summarise
from dlrm.train import click_metrics


def test_click_metrics():
    labels = np.array([0, 0, 1, 1], dtype=np.float32)
    probs = np.array([0.1, 0.6, 0.4, 0.9], dtype=np.float32)
    scores = click_metrics(labels, probs)
    assert scores["auc"] == pytest.approx(0.75)
    assert scores["accuracy"] == pytest.approx(0.5)
    expected = -np.mean(np.log([0.9, 0.4, 0.4, 0.9]))
    assert scores["logloss"] == pytest.approx(expected, rel=1e-6)


def test_auc_is_none_when_only_one_class_is_present():
    assert click_metrics(np.zeros(3, np.float32), np.array([0.1, 0.2, 0.3], np.float32))["auc"] is None


def test_plan_times_full_batches_and_warms_up_on_others():
    warm, timed = plan((100, 1100), batch_size=300, warmup=2, max_batches=2)
    assert timed == [(100, 400), (400, 700)]
    assert warm == [(700, 1000), (100, 400)]  # the short (1000, 1100) is never used; wraps around


def test_plan_for_a_shard_smaller_than_a_batch():
    warm, timed = plan((0, 50), batch_size=512, warmup=3, max_batches=10)
    assert timed == [(0, 50)] * 10 and warm == [(0, 50)] * 3


def test_plan_goes_round_a_short_shard_to_time_max_batches():
    warm, timed = plan((0, 1000), batch_size=300, warmup=1, max_batches=5)
    assert timed == [(0, 300), (300, 600), (600, 900), (0, 300), (300, 600)]
    assert warm == [(600, 900)]


def test_plan_rejects_an_empty_shard():
    with pytest.raises(ValueError, match="empty"):
        plan((7, 7), batch_size=8, warmup=1, max_batches=1)


def test_summary_adds_rank_throughputs_and_pools_latencies():
    per_rank = [{"latencies": [0.01, 0.01], "rows": 200, "gemm_readings": [100.0, 120.0]},
                {"latencies": [0.02, 0.02], "rows": 200, "gemm_readings": [90.0, 130.0]}]
    summary = summarise(per_rank, batch_size=100, threads=1)
    assert summary["samples_per_s"] == pytest.approx(200 / 0.02 + 200 / 0.04)
    assert summary["latency_ms"]["mean"] == pytest.approx(15.0)
    assert summary["latency_ms"]["p50"] == pytest.approx(15.0)
    assert summary["batches"] == 4 and summary["rows"] == 400 and summary["ranks"] == 2
    assert summary["gemm_gflops"] == pytest.approx(110.0 + 110.0)  # each rank's mean GEMM sample, summed
    # A point timed without GEMM samples (a variant's) has no ceiling.
    assert "gemm_gflops" not in summarise([{**r, "gemm_readings": []} for r in per_rank], 100, threads=1)


def test_a_failure_is_one_stderr_line_and_a_nonzero_status(capsys):
    def broken(argv):
        raise FileNotFoundError("no such file:\n  manifest.json")

    assert runner.run(broken, "dlrm.test", []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("dlrm.test: rank ") and "FileNotFoundError: no such file: manifest.json" in err
