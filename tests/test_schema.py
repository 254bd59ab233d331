"""The results JSON Schema: real-shaped runs validate, broken ones fail naming the path, METRICS agrees."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from jsonschema import Draft202012Validator

from bench.schema import METRICS, ResultsInvalid, schema, validate

IPEX = {"used": False, "reason": "not importable: ModuleNotFoundError: No module named 'intel_extension_for_pytorch'"}


def succeeded_run() -> dict:
    """A succeeded tiny-profile run, as bench.pipeline writes it (values from a real run)."""
    return {
        "schema_version": 1,
        "run_id": "tiny-20261204T202900Z",
        "profile": "tiny",
        "status": "succeeded",
        "error": None,
        "started_at": "2026-12-04T20:29:00Z",
        "finished_at": "2026-12-04T20:30:29Z",
        "git": {"sha": "df975cb4913644d62f27a17887e5c5cf0e3b85b3", "dirty": True},
        "machine": {"cpu_model": "AMD EPYC", "logical_cpus": 2, "physical_cpus": 2, "memory_bytes": 25276203008,
                    "os": "Linux 6.18.44", "hostname": "vm"},
        "software": {"python": "3.11.7", "torch": "2.13.0+cpu", "ray": "2.60.0", "raydp": "1.6.5", "pyspark": "3.5.7",
                     "numpy": "2.4.6", "pyarrow": "26.0.1", "scikit-learn": "1.9.1", "mpi": "MPICH 4.3.2",
                     "java": "17 (PATH)", "backend": "gloo", "ipex": IPEX},
        "cluster": {"nodes": 1, "ranks": 2, "ranks_per_node": 2, "ray": {"address": "192.0.2.2:34601", "nodes": 1},
                    "placement": [{"rank": 0, "node_id": "77adc75e", "ip": "192.0.2.2", "cores": [0]},
                                  {"rank": 1, "node_id": "77adc75e", "ip": "192.0.2.2", "cores": [1]}]},
        "config": {
            "profile": "tiny",
            "data": {"source": "synthetic", "dir": "/tmp/tinydata", "days": 2, "rows_per_day": 20000, "seed": 0,
                     "synthetic": {"max_cardinality": 2000, "zipf_exponent": 1.2, "click_rate": 0.25,
                                   "interaction_pairs": 8, "signal_scale": 1.5, "effect_half_count": 30.0}},
            "preprocess": {"engine": "raydp", "executors": 2, "executor_cores": 1, "executor_memory": "1g",
                           "freq_threshold": 2},
            "model": {"embedding_dim": 16, "bottom_mlp": [64, 16], "top_mlp": [64, 1]},
            "train": {"ranks_per_node": 2, "batch_size": 512, "epochs": 1, "dense_lr": 0.001, "sparse_lr": 0.05,
                      "seed": 0, "eval_batch_size": 4096},
            "inference": {"ranks": 1, "batch_size": 512, "warmup_batches": 5, "max_batches": 20},
            "cluster": {"nodes": 1, "cpus_per_node": None},
            "results_dir": "/tmp/tinyres",
        },
        "dataset": {"source": "synthetic", "path": "/tmp/tinydata/raw/synthetic-02e20e68639b", "train_days": [0, 1],
                    "eval_day": 2, "oracle_auc": {"test": 0.8274544531212653, "val": 0.821986798644475,
                                                  "eval_day": 0.8247369528298029},
                    "rows": {"train": 40000, "test": 10000, "val": 10000},
                    "processed_path": "/tmp/tinydata/processed/fd686957be87"},
        "stages": {
            "data": {"reused": False, "rows_per_s": 21568.1, "seconds": 2.83},
            "preprocess": {"reused": False, "spark_startup_seconds": 12.42, "job_seconds": 50.037, "rows_per_s": 1199.1,
                           "rows_read": {"train": 40000, "eval": 20000}, "rows_rejected": 0,
                           "vocab_sizes": [1421, 11, 11, 11, 11, 4, 11, 11, 11, 1421, 149, 21, 11, 11, 11, 11, 5, 11,
                                           11, 1042, 1108, 582, 30, 11, 11, 11],
                           "seconds": 62.459},
            "train": {"samples_per_s": 15965.714919308122, "steps": 78, "samples": 39936,
                      "final_loss": 0.442085862159729, "backend": "gloo", "ipex": IPEX, "threads_per_rank": 1,
                      "seconds": 12.392},
            "evaluate": {"seconds": 0.08228623099989818, "auc": 0.7891664356873078, "logloss": 0.4563615794098034,
                         "accuracy": 0.7861, "rows": 10000, "oracle_auc": 0.8274544531212653, "auc_gap": 0.03829},
            "inference": {"samples_per_s": 6873.3702431355305,
                          "latency_ms": {"p50": 17.592846000070494, "p99": 247.05578945984144,
                                         "mean": 74.4903856316102},
                          "batch_size": 512, "batches": 19, "ranks": 1, "seconds": 4.57},
        },
        "total_seconds": 88.854,
    }


def failed_in_preprocess() -> dict:
    """A run whose preprocess stage failed: the data stage, and preprocess with only its wall time."""
    run = succeeded_run()
    run.update(status="failed", error="stage preprocess failed: missing day files: day_2 (log: logs/preprocess.log)")
    run["stages"] = {"data": run["stages"]["data"], "preprocess": {"seconds": 0.004}}
    run["dataset"] = {key: run["dataset"][key] for key in ("source", "path", "train_days", "eval_day", "oracle_auc")}
    return run


def test_a_succeeded_run_validates():
    validate(succeeded_run())


def test_a_failed_run_with_only_the_data_stage_validates():
    run = succeeded_run()
    run.update(status="failed", error="stage preprocess failed: boom")
    run["stages"] = {"data": run["stages"]["data"]}
    validate(run)


@pytest.mark.parametrize("status", ["failed", "interrupted"])
def test_a_run_stopped_inside_a_stage_validates(status):
    run = failed_in_preprocess()
    run["status"] = status
    validate(run)


def test_a_succeeded_run_without_auc_fails_naming_the_path():
    run = succeeded_run()
    del run["stages"]["evaluate"]["auc"]
    with pytest.raises(ResultsInvalid, match=r"^stages\.evaluate\.auc: required for a succeeded run"):
        validate(run)


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(run: dict) -> None:
        *parents, last = path.split(".")
        node = run
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


@pytest.mark.parametrize(("edit", "path", "problem"), [
    (_set("stages.evaluate.auc", 1.5), "stages.evaluate.auc", "greater than the maximum of 1"),
    (_set("stages.evaluate.auc", None), "stages.evaluate.auc", "not of type 'number'"),
    (_set("stages.train.samples_per_s", -1.0), "stages.train.samples_per_s", "less than the minimum of 0"),
    (_set("stages.train.final_loss", float("nan")), "stages.train.final_loss", "nan is not a finite number"),
    (_set("stages.inference.latency_ms.p99", "247"), "stages.inference.latency_ms.p99", "not of type 'number'"),
    (_set("stages.export", {"seconds": -2}), "stages.export.seconds", "less than the minimum of 0"),
    (_set("cluster.placement", [{"rank": -1, "node_id": "n", "ip": "x", "cores": [0]}]), "cluster.placement[0].rank",
     "less than the minimum of 0"),
    (_set("status", "done"), "status", "is not one of"),
    (_set("error", "boom"), "error", "not of type 'null'"),
    (_set("total_seconds", None), "total_seconds", "not of type 'number'"),
    (_set("schema_version", 2), "schema_version", "1 was expected"),
    (_set("surprise", 1), "(top level)", "'surprise' was unexpected"),
])
def test_broken_results_fail_with_one_line_naming_the_path(edit, path, problem):
    run = succeeded_run()
    edit(run)
    with pytest.raises(ResultsInvalid) as raised:
        validate(run)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_a_failed_run_names_its_error():
    run = failed_in_preprocess()
    run["error"] = None
    with pytest.raises(ResultsInvalid, match=r"^error: None is not of type 'string'"):
        validate(run)


def test_the_schema_is_a_valid_draft_2020_12_schema():
    Draft202012Validator.check_schema(schema())


def _annotations(node: dict, path: str, root: dict) -> Iterator[tuple[str, str, str]]:
    """(dotted path, x-unit, x-better) for every annotated property reached from the top level."""
    if "$ref" in node:
        node = {**root["$defs"][node["$ref"].removeprefix("#/$defs/")], **node}
    if "x-unit" in node:
        yield path, node["x-unit"], node["x-better"]
    for key, child in node.get("properties", {}).items():
        yield from _annotations(child, f"{path}.{key}" if path else key, root)


def test_metrics_table_and_schema_annotations_agree():
    root = schema()
    found = list(_annotations(root, "", root))
    assert {path: (unit, better) for path, unit, better in found} == {
        path: (metric.unit, metric.better) for path, metric in METRICS.items()
    }
    # No annotation hides where the walk above does not look (e.g. inside a $def no property uses).
    assert json.dumps(root).count('"x-unit"') == len(found)


def test_metrics_are_well_formed():
    for path, metric in METRICS.items():
        assert metric.better in ("higher", "lower") and metric.kind in ("absolute", "relative"), path
        assert metric.threshold > 0, path
