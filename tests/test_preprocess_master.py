"""Preprocessing on an existing Spark cluster (preprocess.engine=master): settings, and a real standalone
master and worker on 127.0.0.1 giving the same bytes as local Spark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import pyspark
from bench import cluster, launch
from bench.config import ConfigError, resolve
from preprocess import spark_job
from preprocess.arrays import file_digests
from tests.conftest import criteo_line, write_day

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["preprocess.engine=master"], "engine master needs preprocess.master=spark://host:port"),
        (["preprocess.master=spark://h:7077"], "preprocess.master is only used with engine master (engine is raydp)"),
        (["preprocess.engine=local", "preprocess.master=spark://h:7077"], "(engine is local)"),
        (["preprocess.engine=master", "preprocess.master=http://h:7077"], "must be a Spark master URL"),
        (["preprocess.engine=master", "preprocess.master=spark://h"], "must be a Spark master URL"),
    ],
)
def test_master_setting_is_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        resolve("tiny", overrides)
    assert "\n" not in str(err.value)


def test_master_url_is_taken_with_its_engine():
    cfg = resolve("tiny", ["preprocess.engine=master", "preprocess.master=spark://127.0.0.1:7077"]).preprocess
    assert (cfg.engine, cfg.master) == ("master", "spark://127.0.0.1:7077")
    standby = resolve("tiny", ["preprocess.engine=master", "preprocess.master=spark://a:7077,b:7077"]).preprocess
    assert standby.master == "spark://a:7077,b:7077"
    assert resolve("tiny").preprocess.master is None


def _days(folder: Path) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(11)

    def line() -> str:
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-2, 500))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 9 + j)) * 2654435761 % (1 << 32):08x}"
                for j in range(26)]
        return criteo_line(int(rng.integers(0, 2)), ints, cats)

    train = [write_day(folder / f"day_{d}", [line() for _ in range(400)] + ["not a criteo line\n"]) for d in range(2)]
    return train, [write_day(folder / "day_2", [line() for _ in range(301)])]


def _standalone(tmp: Path, env: dict[str, str], procs: list[subprocess.Popen]) -> str:
    """A Spark standalone master and one worker (1 core, 1 GB) on 127.0.0.1, from pyspark's own scripts;
    their processes are appended to ``procs`` as they start. Returns the master URL."""
    spark_class = str(Path(pyspark.__file__).parent / "bin" / "spark-class")
    port, ui = launch.free_port(), launch.free_port()
    master = f"spark://127.0.0.1:{port}"

    def start(name: str, args: list[str]) -> None:
        with open(tmp / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([spark_class, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                          cwd=tmp, start_new_session=True))

    start("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                     "--webui-port", str(ui)])
    start("worker", ["org.apache.spark.deploy.worker.Worker", master, "--host", "127.0.0.1", "--cores", "1",
                     "--memory", "1g", "--webui-port", str(launch.free_port()), "--work-dir", str(tmp / "work")])
    # The master's status page counts its workers once they have registered.
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5) as page:
                if json.load(page).get("aliveworkers", 0) >= 1:
                    return master
        except (OSError, ValueError):  # not listening yet, or a page still empty while the master starts
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            logs = " | ".join((tmp / f"{n}.log").read_text()[-500:] for n in ("master", "worker"))
            raise RuntimeError(f"the standalone Spark master or worker did not come up: {logs}")
        time.sleep(0.5)


def _job_on_master(master: str, train: list[Path], evaluation: list[Path], out: Path, scratch: Path,
                   env: dict[str, str]) -> dict:
    """The job as its own driver process (one Spark session per process), against ``master``."""
    code = f"""
import json
from pathlib import Path
from bench import cluster
from bench.config import resolve
from preprocess import spark_job
from preprocess.arrays import file_digests
cfg = resolve("tiny", ["preprocess.engine=master", "preprocess.master={master}", "preprocess.executors=1",
                       "preprocess.executor_cores=1", "preprocess.executor_memory=1g",
                       "preprocess.freq_threshold=2"]).preprocess
train = [Path(p) for p in {json.dumps([str(p) for p in train])}]
evaluation = [Path(p) for p in {json.dumps([str(p) for p in evaluation])}]
with cluster.spark_session(cfg, Path({json.dumps(str(scratch))})) as spark:
    assert spark.sparkContext.master == {json.dumps(master)}
    m = spark_job.run(spark, cfg, train, evaluation, Path({json.dumps(str(out))}), range_bytes=20011)
print("MANIFEST" + json.dumps(m))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("MANIFEST", 1)[1])


@pytest.mark.integration
def test_job_on_a_standalone_master_writes_the_same_bytes_as_local_spark(local_spark, tmp_path):
    train, evaluation = _days(tmp_path)
    cfg = resolve("tiny", ["preprocess.engine=local", "preprocess.freq_threshold=2"]).preprocess
    local = spark_job.run(local_spark, cfg, train, evaluation, tmp_path / "local")

    env = dict(os.environ, **cluster.engine_environment(dict(os.environ)), SPARK_LOCAL_IP="127.0.0.1",
               PYTHONPATH=str(REPO))
    procs: list[subprocess.Popen] = []
    try:
        master = _standalone(tmp_path, env, procs)
        remote = _job_on_master(master, train, evaluation, tmp_path / "remote", tmp_path / "scratch", env)
    finally:
        for p in reversed(procs):  # worker, then master: each with its process group
            launch.stop(p)
    assert remote["timing"]["input_ranges"] > 3  # several ranges, on the worker's executor
    assert remote["rows_read"] == local["rows_read"] == {"train": 802, "eval": 301}
    assert remote["rows_rejected"] == local["rows_rejected"] == {"train": 2, "eval": 0}
    assert remote["files"] == local["files"]
    assert file_digests(tmp_path / "remote") == local["files"]  # the bytes on disk, hashed again
