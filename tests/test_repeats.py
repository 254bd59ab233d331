"""REPEAT=N bookkeeping: samples, medians and spread (unit)."""

from bench import repeats


def _results(train: float, auc: float, rows: float | None = None) -> dict:
    stages = {"train": {"samples_per_s": train, "seconds": 10.0}, "evaluate": {"auc": auc},
              "data": {"rows_per_s": 5.0}}
    if rows is not None:
        stages["preprocess"] = {"rows_per_s": rows}
    return {"stages": stages}


def test_samples_hold_only_the_repeated_stages_asked_for():
    s = repeats.sample(_results(100.0, 0.8, rows=7.0), ("train", "evaluate"))
    assert s == {"stages.train.samples_per_s": 100.0, "stages.train.seconds": 10.0, "stages.evaluate.auc": 0.8}


def test_summary_gives_median_range_and_relative_spread_and_medians_replace_values():
    samples = [repeats.sample(_results(v, 0.8)) for v in (90.0, 100.0, 120.0)]
    summary = repeats.summarise(samples)
    rec = summary["metrics"]["stages.train.samples_per_s"]
    assert summary["n"] == 3
    assert (rec["values"], rec["median"], rec["min"], rec["max"]) == ([90.0, 100.0, 120.0], 100.0, 90.0, 120.0)
    assert rec["spread"] == 0.3
    assert summary["metrics"]["stages.evaluate.auc"]["spread"] == 0.0
    results = _results(120.0, 0.8)
    repeats.apply_medians(results, summary)
    assert results["stages"]["train"]["samples_per_s"] == 100.0
    assert "stages.data.rows_per_s" not in summary["metrics"]  # data is made once


def test_a_metric_missing_from_one_repeat_is_left_out():
    summary = repeats.summarise([repeats.sample(_results(1.0, 0.8, rows=3.0)), repeats.sample(_results(2.0, 0.8))])
    assert "stages.preprocess.rows_per_s" not in summary["metrics"]
    assert summary["metrics"]["stages.train.samples_per_s"]["median"] == 1.5
