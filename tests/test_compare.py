"""The regression check: verdicts per metric, thresholds, and the command's exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compare import BETTER, MISSING, OK, REGRESSION, SKIPPED, Row, compare, effective_thresholds, main
from tests.test_schema import failed_in_preprocess, succeeded_run

REPO = Path(__file__).resolve().parent.parent


def row(rows: list[Row], metric: str) -> Row:
    return next(r for r in rows if r.metric == metric)


def write(tmp_path: Path, name: str, results: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(results))
    return str(path)


def test_cli_passes_a_file_compared_with_itself(tmp_path):
    path = write(tmp_path, "run", succeeded_run())
    proc = subprocess.run([sys.executable, "-m", "bench.compare", path, path], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "stages.train.samples_per_s" in proc.stdout and "PASS" in proc.stdout


def test_every_metric_of_a_file_compared_with_itself_is_ok():
    rows = compare(succeeded_run(), succeeded_run(), {})
    assert rows and {r.verdict for r in rows} == {OK}


def test_a_faster_baseline_makes_the_candidate_regress(tmp_path, capsys):
    baseline = succeeded_run()
    baseline["stages"]["train"]["samples_per_s"] *= 1.2
    assert row(compare(baseline, succeeded_run(), {}), "stages.train.samples_per_s").verdict == REGRESSION
    assert main([write(tmp_path, "base", baseline), write(tmp_path, "cand", succeeded_run())]) == 1
    assert "stages.train.samples_per_s regressed" in capsys.readouterr().out


@pytest.mark.parametrize(("drop", "expected"), [(0.003, REGRESSION), (0.002, OK), (0.001, OK)])
def test_an_auc_drop_fails_past_0_002(drop, expected):
    candidate = succeeded_run()
    candidate["stages"]["evaluate"]["auc"] -= drop
    assert row(compare(succeeded_run(), candidate, {}), "stages.evaluate.auc").verdict == expected


def test_a_lower_latency_is_better():
    candidate = succeeded_run()
    candidate["stages"]["inference"]["latency_ms"]["p99"] *= 0.5
    got = row(compare(succeeded_run(), candidate, {}), "stages.inference.latency_ms.p99")
    assert got.verdict == BETTER and got.change == pytest.approx(-0.5)


def test_a_custom_threshold_changes_the_verdict(tmp_path):
    candidate = succeeded_run()
    candidate["stages"]["train"]["samples_per_s"] *= 0.8
    assert row(compare(succeeded_run(), candidate, {}), "stages.train.samples_per_s").verdict == REGRESSION
    loose = effective_thresholds({"stages.train.samples_per_s": 0.25})
    assert row(compare(succeeded_run(), candidate, loose), "stages.train.samples_per_s").verdict == OK
    files = [write(tmp_path, "base", succeeded_run()), write(tmp_path, "cand", candidate)]
    assert main([*files, "--threshold", "stages.train.samples_per_s=0.25"]) == 0


def test_relative_scale_loosens_relative_thresholds_only():
    thresholds = effective_thresholds({"stages.inference.latency_ms.p99": 0.3}, relative_scale=2.0)
    assert thresholds["stages.train.samples_per_s"] == pytest.approx(0.20)
    assert thresholds["stages.evaluate.auc"] == pytest.approx(0.002)
    assert thresholds["stages.inference.latency_ms.p99"] == 0.3  # explicit thresholds are not scaled


def test_a_missing_metric_is_reported_but_does_not_fail(tmp_path):
    candidate = succeeded_run()
    del candidate["stages"]["data"]["rows_per_s"]
    got = row(compare(succeeded_run(), candidate, {}), "stages.data.rows_per_s")
    assert got.verdict == MISSING and got.candidate is None
    assert main([write(tmp_path, "base", succeeded_run()), write(tmp_path, "cand", candidate)]) == 0


def test_a_reused_stage_is_skipped_not_judged():
    candidate = succeeded_run()
    candidate["stages"]["preprocess"].update(reused=True, seconds=0.01)
    rows = compare(succeeded_run(), candidate, {})
    assert row(rows, "stages.preprocess.seconds").verdict == SKIPPED
    assert row(rows, "total_seconds").verdict == SKIPPED
    assert row(rows, "stages.train.seconds").verdict == OK


def test_a_failed_candidate_fails(tmp_path, capsys):
    files = [write(tmp_path, "base", succeeded_run()), write(tmp_path, "cand", failed_in_preprocess())]
    assert main(files) == 1
    assert "candidate run tiny-20261204T202900Z failed: stage preprocess failed" in capsys.readouterr().out


def test_an_invalid_file_exits_2_with_the_path(tmp_path, capsys):
    broken = succeeded_run()
    broken["stages"]["evaluate"]["auc"] = 1.5
    assert main([write(tmp_path, "base", succeeded_run()), write(tmp_path, "cand", broken)]) == 2
    assert "stages.evaluate.auc: 1.5 is greater than the maximum of 1" in capsys.readouterr().err
