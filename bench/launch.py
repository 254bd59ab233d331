"""Launch ranks with MPI (the venv's MPICH ``mpiexec``) on the nodes a placement reserved."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.cluster import Placement

REPO = Path(__file__).resolve().parent.parent
PROGRESS = "PROGRESS "


class LaunchError(RuntimeError):
    """The ranks failed; the message names the log file to read."""


def mpiexec() -> str:
    """The venv's mpiexec (installed by the ``mpich`` package), else one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        raise LaunchError("mpiexec not found; run `make setup` (requirements.txt installs mpich)")
    return found


def mpi_version() -> str:
    out = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True, timeout=30).stdout
    lines = [line.strip() for line in out.splitlines() if "Version" in line]
    return "MPICH " + lines[0].split(":", 1)[-1].strip() if lines else "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(placement: Placement, ranks_per_node: int, module: str, args: list[str], env: dict[str, str]) -> list[str]:
    """The mpiexec command line: ranks packed node by node, environment passed to every rank."""
    world = ranks_per_node * len(placement.nodes)
    cmd = [mpiexec(), "-n", str(world), "-ppn", str(ranks_per_node)]
    if len(placement.nodes) == 1:
        # One node: Hydra forks the proxy locally; no remote shell involved.
        cmd += ["-launcher", "fork"]
    else:
        cmd += ["-hosts", ",".join(f"{ip}:{ranks_per_node}" for ip in placement.hosts)]
    for key, value in env.items():
        cmd += ["-genv", key, value]
    return cmd + [sys.executable, "-u", "-m", module, *args]


def run(
    placement: Placement,
    ranks_per_node: int,
    module: str,
    args: list[str],
    log_file: Path,
    threads_per_rank: int,
    on_progress: Callable[[dict], None] = lambda p: None,
) -> None:
    """Run ``python -m module args`` on every rank; stream output to ``log_file``; raise LaunchError on failure."""
    master = "127.0.0.1" if len(placement.nodes) == 1 else placement.hosts[0]
    env = {
        "MASTER_ADDR": master,
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": str(threads_per_rank),
        "PYTHONPATH": str(REPO),
    }
    cmd = command(placement, ranks_per_node, module, args, env)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", buffering=1) as log:  # line-buffered: the log is live
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, **env},
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if line.startswith(PROGRESS):
                    on_progress(json.loads(line[len(PROGRESS):]))
            code = proc.wait()
        finally:
            stop(proc)
    if code != 0:
        raise LaunchError(f"{module} exited with code {code}: {_last_error(log_file)} (log: {log_file})")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate the launcher and every rank it started (they share its process group)."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _last_error(log_file: Path) -> str:
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:300]
