"""The MLPerf-style log: ``:::MLLOG`` JSON lines with the DLRM keys, stamped with the run's own times."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from mlperf_logging.compliance_checker.mlp_parser import parse_file

from bench.mllog import write_mllog
from tests.test_schema import failed_in_preprocess, succeeded_run

PREFIX = ":::MLLOG "


def ms(timestamp: str) -> int:
    return int(dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000)


def log(tmp_path: Path, results: dict) -> list[dict]:
    """Write the log and return its records; every line must be a ``:::MLLOG`` JSON line."""
    path = tmp_path / "mllog.log"
    write_mllog(results, path)
    lines = path.read_text().splitlines()
    assert lines and all(line.startswith(PREFIX) for line in lines)
    # The package's own parser reads it without error.
    parsed, errors = parse_file(str(path), ruleset="6.1.0")
    assert errors == [] and len(parsed) == len(lines)
    return [json.loads(line[len(PREFIX):]) for line in lines]


def values(records: list[dict], key: str) -> list:
    return [r["value"] for r in records if r["key"] == key]


def one(records: list[dict], key: str) -> dict:
    found = [r for r in records if r["key"] == key]
    assert len(found) == 1, f"{key}: {len(found)} records"
    return found[0]


def test_a_succeeded_run_logs_the_dlrm_keys(tmp_path):
    run = succeeded_run()
    records = log(tmp_path, run)
    assert one(records, "submission_benchmark")["value"] == "dlrm"
    assert one(records, "global_batch_size")["value"] == 512
    assert one(records, "opt_base_learning_rate")["value"] == 0.001
    assert one(records, "opt_sparse_base_learning_rate")["value"] == 0.05
    assert one(records, "seed")["value"] == 0
    assert one(records, "train_samples")["value"] == 40000
    assert one(records, "eval_samples")["value"] == 10000
    assert one(records, "embedding_dim")["value"] == 16
    assert one(records, "embedding_table_sizes")["value"] == run["stages"]["preprocess"]["vocab_sizes"]
    assert one(records, "train_samples_per_s")["value"] == run["stages"]["train"]["samples_per_s"]
    assert one(records, "inference_latency_ms")["value"] == run["stages"]["inference"]["latency_ms"]

    accuracy = one(records, "eval_accuracy")
    assert accuracy["value"] == run["stages"]["evaluate"]["auc"]
    assert accuracy["metadata"]["samples_count"] == 39936
    assert accuracy["metadata"]["epoch_num"] == 39936 / 40000


def test_times_come_from_the_run_and_stay_in_order(tmp_path):
    run = succeeded_run()
    records = log(tmp_path, run)
    start, stop = one(records, "run_start"), one(records, "run_stop")
    assert (start["event_type"], stop["event_type"]) == ("INTERVAL_START", "INTERVAL_END")
    assert start["time_ms"] == ms(run["started_at"]) and stop["time_ms"] == ms(run["finished_at"])
    assert stop["metadata"]["status"] == "success" and stop is records[-1]
    times = [r["time_ms"] for r in records]
    assert times == sorted(times)
    # The final AUC is stamped at the end of the evaluate stage: the stages' seconds up to it.
    stages = run["stages"]
    through_evaluate = sum(stages[s]["seconds"] for s in ("data", "preprocess", "train", "evaluate"))
    assert one(records, "eval_accuracy")["time_ms"] == start["time_ms"] + round(through_evaluate * 1000)


def test_an_auc_curve_logs_one_accuracy_per_point_then_the_final_auc(tmp_path):
    run = succeeded_run()
    curve = [{"step": 20, "samples": 10240, "auc": 0.70, "loss": 0.51},
             {"step": 40, "samples": 20480, "auc": 0.75, "loss": 0.48},
             {"step": 78, "samples": 39936, "auc": 0.78, "loss": 0.45}]
    run["stages"]["train"]["auc_curve"] = curve
    records = log(tmp_path, run)
    accuracies = [r for r in records if r["key"] == "eval_accuracy"]
    assert [r["value"] for r in accuracies] == [0.70, 0.75, 0.78, run["stages"]["evaluate"]["auc"]]
    assert [r["metadata"]["samples_count"] for r in accuracies] == [10240, 20480, 39936, 39936]
    assert all("epoch_num" in r["metadata"] for r in accuracies)
    times = [r["time_ms"] for r in accuracies]
    assert times == sorted(times) and len(set(times)) == 4


def test_a_curve_ending_on_the_final_auc_does_not_log_it_twice(tmp_path):
    run = succeeded_run()
    final = run["stages"]["evaluate"]["auc"]
    run["stages"]["train"]["auc_curve"] = [{"step": 40, "samples": 20480, "auc": 0.75, "loss": 0.48},
                                           {"step": 78, "samples": 39936, "auc": final, "loss": 0.45}]
    assert values(log(tmp_path, run), "eval_accuracy") == [0.75, final]


def test_a_failed_run_stops_aborted_without_an_accuracy(tmp_path):
    run = failed_in_preprocess()
    records = log(tmp_path, run)
    assert one(records, "run_stop")["metadata"]["status"] == "aborted"
    assert values(records, "eval_accuracy") == []
    assert values(records, "submission_benchmark") == ["dlrm"]


def test_a_run_without_a_finish_has_no_run_stop(tmp_path):
    run = failed_in_preprocess()
    run.update(status="running", error=None, finished_at=None, total_seconds=None)
    records = log(tmp_path, run)
    assert values(records, "run_start") == [None] and values(records, "run_stop") == []
