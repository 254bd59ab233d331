"""The regression check: verdicts per metric, thresholds, and the command's exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compare import (BETTER, MISSING, NORMALISED, OK, RAW, REGRESSION, SKIPPED, WITHIN_SPREAD, Row, compare,
                           effective_thresholds, main)
from bench.schema import ResultsInvalid, validate
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


# Normalised by the measured machine: figures from a real run's machine.measured.
MEASURED = {"gemm_gflops": {"fp32": 90.70493344607418, "bf16": 186.30042594922617},
            "machine_gemm_gflops": {"fp32": 181.40986689214836, "bf16": 372.60085189845233},
            "bf16_native": True, "memory_gb_per_s": 20.542204614117633, "threads_per_rank": 1, "ranks": 2,
            "seconds": 3.202}
SPEEDS = ("stages.data.rows_per_s", "stages.preprocess.rows_per_s", "stages.train.samples_per_s",
          "stages.inference.samples_per_s")
TIMES = ("stages.inference.latency_ms.p50", "stages.inference.latency_ms.p99", "stages.data.seconds",
         "stages.preprocess.seconds", "stages.train.seconds", "stages.evaluate.seconds", "stages.inference.seconds",
         "total_seconds")


def measured_run(gemm_scale: float = 1.0, precision: str | None = None) -> dict:
    run = succeeded_run()
    run["machine"]["measured"] = json.loads(json.dumps(MEASURED))
    for rates in (run["machine"]["measured"]["gemm_gflops"], run["machine"]["measured"]["machine_gemm_gflops"]):
        for dtype in rates:
            rates[dtype] *= gemm_scale
    if precision:
        run["stages"]["train"]["precision"] = precision
    return run


def slow_down(run: dict, factor: float, paths: tuple[str, ...] = SPEEDS + TIMES) -> dict:
    """Speeds times ``factor``, times divided by it: the same run going ``factor`` as fast."""
    for path in paths:
        *parents, last = path.split(".")
        node = run
        for key in parents:
            node = node[key]
        node[last] = node[last] * factor if path in SPEEDS else node[last] / factor
    return run


def test_a_machine_30_percent_slower_is_not_a_regression_normalised_but_is_raw(tmp_path, capsys):
    baseline, candidate = measured_run(), slow_down(measured_run(gemm_scale=0.7), 0.7)
    validate(candidate)
    rows = compare(baseline, candidate, {})
    for path in SPEEDS + TIMES:
        got = row(rows, path)
        assert got.decided_by == NORMALISED and got.normalised_change == pytest.approx(0, abs=1e-9), path
        assert got.verdict == OK, path
    assert row(rows, "stages.train.samples_per_s").change == pytest.approx(-0.3)
    assert row(rows, "stages.inference.latency_ms.p99").change == pytest.approx(1 / 0.7 - 1)
    auc = row(rows, "stages.evaluate.auc")
    assert auc.decided_by == RAW and auc.normalised_change is None  # AUC does not scale with the machine

    raw = compare(baseline, candidate, {}, raw=True)
    assert row(raw, "stages.train.samples_per_s").verdict == REGRESSION
    assert {r.decided_by for r in raw} == {RAW}
    assert row(raw, "stages.train.samples_per_s").normalised_change == pytest.approx(0, abs=1e-9)  # still shown

    files = [write(tmp_path, "base", baseline), write(tmp_path, "cand", candidate)]
    assert main(files) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "normalised" in out and "-30.0%" in out
    assert main([*files, "--raw"]) == 1
    out = capsys.readouterr().out
    assert "stages.train.samples_per_s regressed: -30.0% raw (+0.0% normalised)" in out and "--raw" in out


def test_a_run_30_percent_slower_on_the_same_measured_machine_regresses(tmp_path, capsys):
    baseline, candidate = measured_run(), slow_down(measured_run(), 0.7)
    rows = compare(baseline, candidate, {})
    for path in SPEEDS + TIMES:
        got = row(rows, path)
        assert got.decided_by == NORMALISED and got.normalised_change == pytest.approx(got.change), path
        # Evaluation's loose 50% threshold lets its wall time grow by 43%.
        assert got.verdict == (OK if path == "stages.evaluate.seconds" else REGRESSION), path
    assert main([write(tmp_path, "base", baseline), write(tmp_path, "cand", candidate)]) == 1
    assert "stages.train.samples_per_s regressed: -30.0% normalised (-30.0% raw)" in capsys.readouterr().out


def test_a_slower_machine_does_not_hide_a_slower_code():
    # 30% less GEMM but 50% fewer samples/s: per GFLOP/s the code is 29% slower.
    candidate = slow_down(measured_run(gemm_scale=0.7), 0.5, ("stages.train.samples_per_s",))
    got = row(compare(measured_run(), candidate, {}), "stages.train.samples_per_s")
    assert got.normalised_change == pytest.approx(0.5 / 0.7 - 1) and got.verdict == REGRESSION


def test_training_is_normalised_by_the_gemm_rate_of_its_precision():
    # Only the bf16 GEMM rate fell: bf16 training may be slower by as much, fp32 inference may not.
    candidate = measured_run(precision="bf16")
    candidate["machine"]["measured"]["machine_gemm_gflops"]["bf16"] *= 0.7
    slow_down(candidate, 0.7, ("stages.train.samples_per_s", "stages.inference.samples_per_s"))
    rows = compare(measured_run(precision="bf16"), candidate, {})
    assert row(rows, "stages.train.samples_per_s").verdict == OK
    assert row(rows, "stages.inference.samples_per_s").verdict == REGRESSION
    # A file without stages.train.precision trained in fp32, and is normalised by the fp32 rate.
    del candidate["stages"]["train"]["precision"]
    got = row(compare(measured_run(precision="bf16"), candidate, {}), "stages.train.samples_per_s")
    assert got.normalised_change == pytest.approx(0.7 / MEASURED["machine_gemm_gflops"]["fp32"]
                                                  * MEASURED["machine_gemm_gflops"]["bf16"] - 1)
    assert got.note == "per machine_gemm_gflops.bf16 vs machine_gemm_gflops.fp32"


@pytest.mark.parametrize("unmeasured", ["baseline", "candidate", "baseline and candidate"])
def test_files_without_machine_measured_fall_back_to_raw_and_say_so(tmp_path, capsys, unmeasured):
    files = {"baseline": measured_run(), "candidate": slow_down(measured_run(gemm_scale=0.7), 0.7)}
    for role in unmeasured.split(" and "):
        del files[role]["machine"]["measured"]
    rows = compare(files["baseline"], files["candidate"], {})
    assert {r.decided_by for r in rows} == {RAW} and all(r.normalised_change is None for r in rows)
    assert row(rows, "stages.train.samples_per_s").verdict == REGRESSION
    assert main([write(tmp_path, "base", files["baseline"]), write(tmp_path, "cand", files["candidate"])]) == 1
    out = capsys.readouterr().out
    assert f"no machine.measured in the {unmeasured}: verdicts use raw changes" in out
    assert "stages.train.samples_per_s regressed: -30.0% (threshold 10%)" in out


def test_a_measured_file_lacking_the_figure_falls_back_to_raw_for_that_metric():
    candidate = slow_down(measured_run(gemm_scale=0.7, precision="bf16"), 0.7, ("stages.train.samples_per_s",))
    del candidate["machine"]["measured"]["machine_gemm_gflops"]["bf16"]
    rows = compare(measured_run(precision="bf16"), candidate, {})
    got = row(rows, "stages.train.samples_per_s")
    assert got.decided_by == RAW and got.verdict == REGRESSION
    assert got.note == "raw: no machine.measured.machine_gemm_gflops.bf16 in candidate"
    assert row(rows, "stages.inference.samples_per_s").decided_by == NORMALISED


# Repeated runs (REPEAT=N): each repeated metric's value is the median of its runs, and results["repeats"]
# records the runs and their spread; a change within the spread is not called a regression.
TRAIN = "stages.train.samples_per_s"


def repeated(run: dict, runs: dict[str, list[float]]) -> dict:
    """``run`` as REPEAT=len(values) writes it: each metric's median as its value, its runs under repeats."""
    metrics = {}
    for path, values in runs.items():
        ordered = sorted(values)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        metrics[path] = {"values": values, "median": median, "min": ordered[0], "max": ordered[-1],
                         "spread": (ordered[-1] - ordered[0]) / median}
        *parents, last = path.split(".")
        node = run
        for key in parents:
            node = node[key]
        node[last] = median
    run["repeats"] = {"n": len(next(iter(runs.values()))), "metrics": metrics}
    validate(run)
    return run


def spread_around(value: float, spread: float) -> list[float]:
    """Three runs with median ``value`` and relative spread ``spread``."""
    return [value * (1 - spread / 2), value, value * (1 + spread / 2)]


def twelve_percent_slower_training(base: dict, cand: dict, baseline_spread: float) -> tuple[dict, dict]:
    """The baseline's training samples/s repeated with the given spread; the candidate 12% slower
    (past the default 10% threshold) in one run, on the same measured machine when both are measured."""
    value = base["stages"]["train"]["samples_per_s"]
    return repeated(base, {TRAIN: spread_around(value, baseline_spread)}), slow_down(cand, 0.88, (TRAIN,))


def test_a_regression_within_the_baselines_spread_is_not_called_one(tmp_path, capsys):
    baseline, candidate = twelve_percent_slower_training(measured_run(), measured_run(), 0.15)
    got = row(compare(baseline, candidate, {}), TRAIN)
    assert got.decided_by == NORMALISED and got.normalised_change == pytest.approx(-0.12)
    assert got.verdict == WITHIN_SPREAD and got.spread == pytest.approx(0.15)
    assert main([write(tmp_path, "base", baseline), write(tmp_path, "cand", candidate)]) == 0
    out = capsys.readouterr().out
    assert "within spread" in out and "15.0%" in out and "PASS" in out
    assert "note: repeated runs (baseline 3 runs, candidate 1 run)" in out
    assert f"within spread: {TRAIN} -12.0% normalised (-12.0% raw) (threshold 10%, spread 15.0%)" in out


def test_a_regression_past_the_spread_still_fails(tmp_path, capsys):
    baseline, candidate = twelve_percent_slower_training(measured_run(), measured_run(), 0.05)
    got = row(compare(baseline, candidate, {}), TRAIN)
    assert got.verdict == REGRESSION and got.spread == pytest.approx(0.05)
    assert main([write(tmp_path, "base", baseline), write(tmp_path, "cand", candidate)]) == 1
    assert f"{TRAIN} regressed: -12.0% normalised (-12.0% raw)" in capsys.readouterr().out


@pytest.mark.parametrize(("spread", "expected"), [(0.15, WITHIN_SPREAD), (0.05, REGRESSION)])
def test_raw_changes_honour_the_spread_too(tmp_path, spread, expected):
    # --raw on measured files, and files without machine.measured (raw is then the only form).
    baseline, candidate = twelve_percent_slower_training(measured_run(), measured_run(gemm_scale=0.88), spread)
    got = row(compare(baseline, candidate, {}, raw=True), TRAIN)
    assert got.decided_by == RAW and got.change == pytest.approx(-0.12) and got.verdict == expected
    files = [write(tmp_path, "base", baseline), write(tmp_path, "cand", candidate)]
    assert main([*files, "--raw"]) == (0 if expected == WITHIN_SPREAD else 1)
    assert main(files) == 0  # normalised: the machine was as much slower as the run

    baseline, candidate = twelve_percent_slower_training(succeeded_run(), succeeded_run(), spread)
    got = row(compare(baseline, candidate, {}), TRAIN)
    assert got.decided_by == RAW and got.verdict == expected


def test_the_candidates_spread_counts_and_the_larger_one_decides():
    candidate = succeeded_run()
    value = candidate["stages"]["train"]["samples_per_s"] * 0.88
    candidate = repeated(candidate, {TRAIN: spread_around(value, 0.15)})
    baseline = repeated(succeeded_run(), {TRAIN: spread_around(succeeded_run()["stages"]["train"]["samples_per_s"],
                                                                0.05)})
    got = row(compare(baseline, candidate, {}), TRAIN)
    assert got.spread == pytest.approx(0.15) and got.verdict == WITHIN_SPREAD


def test_a_spread_hides_no_change_that_was_not_past_the_threshold_and_no_other_metric():
    baseline = repeated(measured_run(), {TRAIN: spread_around(measured_run()["stages"]["train"]["samples_per_s"], 0.5)})
    candidate = slow_down(measured_run(), 0.7, (TRAIN, "stages.inference.samples_per_s"))
    rows = compare(baseline, slow_down(measured_run(), 0.95, (TRAIN,)), {})
    assert row(rows, TRAIN).verdict == OK  # -5%: inside the threshold, nothing to excuse
    rows = compare(baseline, candidate, {})
    assert row(rows, TRAIN).verdict == WITHIN_SPREAD
    assert row(rows, "stages.inference.samples_per_s").verdict == REGRESSION  # not repeated: no spread
    assert row(rows, "stages.inference.samples_per_s").spread is None


def test_an_improvement_within_the_spread_is_not_called_better_either():
    baseline = repeated(measured_run(), {TRAIN: spread_around(measured_run()["stages"]["train"]["samples_per_s"], 0.3)})
    assert row(compare(baseline, slow_down(measured_run(), 1.2, (TRAIN,)), {}), TRAIN).verdict == WITHIN_SPREAD
    assert row(compare(baseline, slow_down(measured_run(), 1.4, (TRAIN,)), {}), TRAIN).verdict == BETTER


def test_an_absolute_metric_is_set_against_the_range_of_its_runs():
    auc = succeeded_run()["stages"]["evaluate"]["auc"]
    baseline = repeated(succeeded_run(), {"stages.evaluate.auc": [auc - 0.002, auc, auc + 0.002]})
    for drop, expected in ((0.003, WITHIN_SPREAD), (0.005, REGRESSION)):
        candidate = succeeded_run()
        candidate["stages"]["evaluate"]["auc"] -= drop
        got = row(compare(baseline, candidate, {}), "stages.evaluate.auc")
        assert got.spread == pytest.approx(0.004) and got.verdict == expected


def test_a_single_run_in_repeats_form_is_judged_as_before():
    baseline = succeeded_run()
    value = baseline["stages"]["train"]["samples_per_s"]
    baseline["repeats"] = {"n": 1, "metrics": {TRAIN: {"values": [value], "median": value, "min": value,
                                                        "max": value, "spread": 0.0}}}
    validate(baseline)
    got = row(compare(baseline, slow_down(succeeded_run(), 0.88, (TRAIN,)), {}), TRAIN)
    assert got.spread is None and got.verdict == REGRESSION


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda r: r.update(n=0), "repeats.n: 0 is less than the minimum of 1"),
    (lambda r: r["metrics"][TRAIN].update(spread=-0.1), f"repeats.metrics.{TRAIN}.spread: -0.1 is less than"),
    (lambda r: r["metrics"][TRAIN].pop("median"), f"repeats.metrics.{TRAIN}.median: required but missing"),
    (lambda r: r["metrics"].update({"not a path": r["metrics"][TRAIN]}), "repeats.metrics: 'not a path' does not"),
])
def test_the_schema_checks_repeats(edit, problem):
    run = repeated(succeeded_run(), {TRAIN: [1.0, 2.0, 3.0]})
    edit(run["repeats"])
    with pytest.raises(ResultsInvalid) as raised:
        validate(run)
    assert str(raised.value).startswith(problem)


def test_best_compares_the_fastest_runs_and_the_lowest_latencies(tmp_path, capsys):
    """Two of the candidate's three runs slowed by interference: its medians are far off, its best runs are not."""
    p50 = "stages.inference.latency_ms.p50"
    base = measured_run()
    train, latency = base["stages"]["train"]["samples_per_s"], base["stages"]["inference"]["latency_ms"]["p50"]
    baseline = repeated(base, {TRAIN: [train] * 3, p50: [latency] * 3})
    candidate = repeated(measured_run(), {TRAIN: [train * 0.6, train * 0.6, train * 0.98],
                                          p50: [latency * 2.5, latency * 1.01, latency * 2.4]})
    medians = compare(baseline, candidate, {})
    assert row(medians, TRAIN).candidate == pytest.approx(train * 0.6) and row(medians, TRAIN).verdict == WITHIN_SPREAD
    # +140% at the median, past the candidate's spread of (2.5 - 1.01) / 2.4 = 62%.
    assert row(medians, p50).candidate == pytest.approx(latency * 2.4) and row(medians, p50).verdict == REGRESSION
    best = compare(baseline, candidate, {}, best=True)
    assert row(best, TRAIN).candidate == pytest.approx(train * 0.98) and row(best, TRAIN).verdict == OK
    assert row(best, p50).candidate == pytest.approx(latency * 1.01) and row(best, p50).verdict == OK
    files = [write(tmp_path, "base", baseline), write(tmp_path, "cand", candidate)]
    assert main([*files, "--best"]) == 0
    assert "note: --best: each file's best repeated run is compared" in capsys.readouterr().out
    # A real regression shows in every run, the best one too.
    slower = repeated(measured_run(), {TRAIN: [train * 0.6, train * 0.62, train * 0.61], p50: [latency] * 3})
    assert row(compare(baseline, slower, {}, best=True), TRAIN).verdict == REGRESSION
