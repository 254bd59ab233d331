"""The real pipeline, every engine started: Ray, RayDP (Spark executors as Ray actors), mpiexec, gloo."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import launch, schema
from bench.config import ModelConfig, resolve
from dlrm import roofline

from tests.engines import REPO, engine_processes, run_pipeline


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    assert not engine_processes(), "engines from an earlier run are still up"
    tmp = tmp_path_factory.mktemp("tiny")
    proc, results = run_pipeline(tmp)
    return tmp, proc, results


@pytest.mark.integration
def test_tiny_pipeline_succeeds_with_every_stage(tiny_run):
    tmp, proc, r = tiny_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["status"] == "succeeded" and r["error"] is None
    schema.validate(r)
    assert set(r["stages"]) == {"data", "preprocess", "train", "evaluate", "inference"}
    assert all(s["seconds"] >= 0 for s in r["stages"].values())
    assert r["total_seconds"] >= sum(s["seconds"] for s in r["stages"].values()) * 0.9
    assert (tmp / "results" / f"{r['run_id']}.json").read_text() == (tmp / "results" / "latest.json").read_text()
    assert "AUC" in proc.stdout and "results:" in proc.stdout


@pytest.mark.integration
def test_tiny_pipeline_counts_every_row(tiny_run):
    _, _, r = tiny_run
    cfg = resolve("tiny")
    rows = cfg.data.rows_per_day
    assert r["stages"]["preprocess"]["rows_read"] == {"train": cfg.data.days * rows, "eval": rows}
    assert r["stages"]["preprocess"]["rows_rejected"] == 0
    assert r["dataset"]["rows"] == {"train": cfg.data.days * rows, "test": rows // 2, "val": rows - rows // 2}
    assert r["stages"]["evaluate"]["rows"] == rows // 2
    assert r["stages"]["train"]["samples"] == (cfg.data.days * rows // cfg.train.batch_size) * cfg.train.batch_size


@pytest.mark.integration
def test_tiny_pipeline_learns_the_click_model(tiny_run):
    _, _, r = tiny_run
    ev = r["stages"]["evaluate"]
    oracle = r["dataset"]["oracle_auc"]["test"]
    assert 0.65 < oracle < 0.95
    # tiny data: a looser bound than the small profile's 0.02
    assert oracle - 0.08 < ev["auc"] <= oracle + 0.01
    assert 0.0 < ev["logloss"] < 0.69 and 0.5 < ev["accuracy"] <= 1.0


@pytest.mark.integration
def test_tiny_pipeline_ran_on_the_real_engines(tiny_run):
    _, _, r = tiny_run
    assert r["cluster"]["ranks"] == 2 and r["cluster"]["nodes"] == 1
    placement = r["cluster"]["placement"]
    assert [p["rank"] for p in placement] == [0, 1] and len(placement[0]["node_id"]) == 56  # a Ray node id
    assert placement[0]["node_id"] == placement[1]["node_id"] and r["cluster"]["launcher"] == "fork"
    assert sorted(placement[0]["cores"] + placement[1]["cores"]) == [0, 1]  # one core each on this 2-core machine
    assert r["software"]["backend"] == "gloo" and r["software"]["mpi"].startswith("MPICH")
    assert r["software"]["ipex"]["used"] is False
    assert r["config"]["preprocess"]["engine"] == "raydp"
    assert r["stages"]["train"]["samples_per_s"] > 0 and r["stages"]["train"]["threads_per_rank"] == 1
    assert r["stages"]["train"]["malloc_environment"] == launch.TRAINING_MALLOC
    assert r["stages"]["train"]["interaction_kernel"]["reason"].startswith(("compiled with", "no C compiler"))
    inf = r["stages"]["inference"]
    assert inf["malloc_environment"] == launch.SERVING_MALLOC
    assert inf["samples_per_s"] > 0 and 0 < inf["latency_ms"]["p50"] <= inf["latency_ms"]["p99"]
    assert r["machine"]["logical_cpus"] >= 1 and r["machine"]["memory_bytes"] > 0
    # The GEMM rates measured before and after training; the roofline's ceiling is the best reading.
    measured = r["machine"]["measured"]
    fp32 = measured["gemm_gflops_readings"]["fp32"]
    assert len(fp32) == 2 and measured["gemm_gflops"]["fp32"] == max(fp32)
    assert measured["machine_gemm_gflops"]["fp32"] == max(fp32) * r["cluster"]["ranks"]
    assert len(measured["gemm_gflops_readings"]["bf16"]) == 1  # trained in fp32: bf16 measured once
    # The fractions: against the GEMM rate sampled during the stage, and against the best probe reading.
    model = ModelConfig.model_validate(r["config"]["model"])
    flops = {training: roofline.flops_per_sample(model, training) for training in (True, False)}
    train, inf = r["stages"]["train"], r["stages"]["inference"]
    for stage, samples_per_s, ceiling, training in ((train, train["samples_per_s"], train["gemm_in_run"]["machine_gflops"], True),
                                                     (inf, inf["best"]["samples_per_s"], inf["gemm_gflops"], False)):
        assert stage["roofline_fraction"] == pytest.approx(samples_per_s * flops[training] / (ceiling * 1e9), abs=1e-4)
        best = measured["machine_gemm_gflops"]["fp32"]
        assert stage["roofline_fraction_best_probe"] == pytest.approx(samples_per_s * flops[training] / (best * 1e9), abs=1e-4)
    assert train["gemm_in_run"]["precision"] == "fp32" and train["gemm_in_run"]["samples"] >= 1
    assert r["git"]["sha"] is None or len(r["git"]["sha"]) == 40


@pytest.mark.integration
def test_nothing_is_left_running(tiny_run):
    assert not engine_processes()


@pytest.mark.integration
def test_second_run_reuses_data_and_preprocessing(tiny_run):
    tmp, _, first = tiny_run
    proc, r = run_pipeline(tmp, "preprocess.engine=local", "train.ranks_per_node=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["stages"]["data"]["reused"] and r["stages"]["preprocess"]["reused"]
    assert r["dataset"]["rows"] == first["dataset"]["rows"]
    assert r["cluster"]["ranks"] == 1
    assert not engine_processes()


@pytest.mark.integration
def test_kaggle_format_file_runs_through(tiny_run, tmp_path):
    tmp, _, first = tiny_run
    lines = b"".join(p.read_bytes() for p in sorted(Path(first["dataset"]["path"]).glob("day_*")))[: 7 * 3000 * 400]
    lines = b"".join(lines.splitlines(keepends=True)[: 7 * 3000])
    (tmp_path / "data" / "kaggle").mkdir(parents=True)
    (tmp_path / "data" / "kaggle" / "train.txt").write_bytes(lines)
    proc, r = run_pipeline(tmp_path, "data.source=kaggle", "data.days=6", "preprocess.engine=local",
                           "train.ranks_per_node=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["dataset"]["train_days"] == [0, 1, 2, 3, 4, 5] and r["dataset"]["eval_day"] == 6
    assert r["stages"]["preprocess"]["rows_read"] == {"train": 18000, "eval": 3000}
    assert r["dataset"]["rows"] == {"train": 18000, "test": 1500, "val": 1500}
    assert r["stages"]["evaluate"]["auc"] > 0.6


def test_missing_kaggle_file_fails_with_results_written(tmp_path):
    proc, r = run_pipeline(tmp_path, "data.source=kaggle")
    assert proc.returncode == 1
    assert r["status"] == "failed" and r["error"].startswith("stage data failed: no Kaggle data: put")
    schema.validate(r)
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "train" not in r["stages"]


def test_wrong_column_count_is_rejected_and_reported(tmp_path):
    raw = tmp_path / "data" / "criteo"  # days on disk are used as they are: no download
    raw.mkdir(parents=True)
    for day in (0, 23):
        (raw / f"day_{day}").write_text("1\t2\t3\n0\t5\n")
    proc, r = run_pipeline(tmp_path, "data.source=criteo", "data.days=1", "preprocess.engine=local")
    assert proc.returncode == 1
    assert "stage preprocess failed: no valid rows in the training days (2 read, all rejected" in r["error"]
    assert "log: " in r["error"]


def test_unknown_profile_is_a_one_line_error(tmp_path):
    proc, r = run_pipeline(tmp_path, profile="huge")
    assert proc.returncode == 2 and r is None
    assert proc.stderr.strip() == "error: unknown profile 'huge'; choose one of full, small, tiny"


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_training_cleans_up_and_records_it(tiny_run, tmp_path, sig):
    tmp, _, _ = tiny_run
    args = [sys.executable, "-m", "bench.pipeline", "--profile", "tiny", "--set", f"data.dir={tmp / 'data'}",
            "--set", f"results_dir={tmp_path}", "--set", "data.rows_per_day=60000"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(tmp_path.glob("runs/*/logs/train.log"))
        if logs and "PROGRESS" in logs[0].read_text():
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    r = json.loads((tmp_path / "latest.json").read_text())
    assert proc.returncode == 130, err[-2000:]
    assert r["status"] == "interrupted" and "interrupted" in r["error"]
    schema.validate(r)
    time.sleep(1)
    assert not engine_processes()


@pytest.mark.integration
def test_repeat_runs_the_timed_stages_again_and_records_medians_and_spread(tmp_path):
    proc, r = run_pipeline(tmp_path, "repeat=2", "preprocess.engine=local", "inference.variants=[fp32]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    schema.validate(r)
    metrics = r["repeats"]["metrics"]
    assert r["repeats"]["n"] == 2
    for path in ("stages.preprocess.rows_per_s", "stages.train.samples_per_s", "stages.inference.samples_per_s"):
        values = metrics[path]["values"]
        assert len(values) == 2 and metrics[path]["median"] == sum(values) / 2
        assert metrics[path]["spread"] == round((max(values) - min(values)) / metrics[path]["median"], 6)
    assert r["stages"]["train"]["samples_per_s"] == metrics["stages.train.samples_per_s"]["median"]
    assert metrics["stages.evaluate.auc"]["values"][0] == metrics["stages.evaluate.auc"]["values"][1]  # same seed
    logs = tmp_path / "results" / "runs" / r["run_id"] / "logs"
    assert {"train-1.log", "train-2.log", "inference-1.log", "inference-2.log"} <= {p.name for p in logs.iterdir()}
    assert not (tmp_path / "results" / "runs" / r["run_id"] / "preprocess-repeat").exists()
