"""Launch ranks with MPI (the venv's MPICH ``mpiexec``) on the nodes a placement reserved."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TextIO
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


def command(placement: Placement, ranks_per_node: int, module: str, args: list[str], env: dict[str, str],
            agent: Path | None = None) -> list[str]:
    """The mpiexec command line: ranks packed node by node, environment passed to every rank.

    How Hydra starts its proxy on each node: through ``agent`` (bench.mpi_agent: a Ray actor on the
    node; the hosts are Ray node ids) when given, else fork on a single node, else ssh to the IPs.
    """
    world = ranks_per_node * len(placement.nodes)
    cmd = [mpiexec(), "-n", str(world), "-ppn", str(ranks_per_node), "-prepend-rank"]
    if agent is not None:
        cmd += ["-launcher", "ssh", "-launcher-exec", str(agent),
                "-hosts", ",".join(f"{n['node_id']}:{ranks_per_node}" for n in placement.nodes)]
    elif len(placement.nodes) == 1:
        cmd += ["-launcher", "fork"]  # one node: Hydra forks the proxy locally
    else:
        cmd += ["-launcher", "ssh", "-hosts", ",".join(f"{ip}:{ranks_per_node}" for ip in placement.hosts)]
    for key, value in env.items():
        cmd += ["-genv", key, value]
    return cmd + [sys.executable, "-m", module, *args]


RANK_LINE = re.compile(r"^\[(\d+)\] ?(.*)$", re.S)  # -prepend-rank's "[r] " prefix
STRAY_PREFIX = re.compile(r"\[\d+\] (?=\n?$)")  # a prefix Hydra put before a newline written on its own
RANK_PID = re.compile(r": rank (\d+) of \d+: pid (\d+)")  # dlrm.runner.start's first line
BAD_TERMINATION = re.compile(r"PID (\d+) RUNNING AT (\S+)\s*=\s*EXIT CODE: (\d+)")


def run(
    placement: Placement,
    ranks_per_node: int,
    module: str,
    args: list[str],
    log_file: Path,
    threads_per_rank: int,
    on_progress: Callable[[dict], None] = lambda p: None,
    agent: Path | None = None,
) -> None:
    """Run ``python -m module args`` on every rank; raise LaunchError on failure.

    Output goes to ``log_file`` (every rank, each line prefixed "[rank]") and to one log per
    rank next to it (``<stem>.rank<r>.log``); rank 0's PROGRESS lines feed ``on_progress``.
    """
    master = "127.0.0.1" if len(placement.nodes) == 1 and agent is None else placement.hosts[0]
    env = {
        "MASTER_ADDR": master,
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": str(threads_per_rank),
        "PYTHONPATH": str(REPO),
        # Buffered output: unbuffered print() writes its newline apart, and Hydra prefixes each write.
        "PYTHONUNBUFFERED": "",
    }
    cmd = command(placement, ranks_per_node, module, args, env, agent)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    rank_logs: dict[int, TextIO] = {}
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
                match = RANK_LINE.match(line)
                if not match:
                    continue
                rank, text = int(match.group(1)), STRAY_PREFIX.sub("", match.group(2))
                if rank not in rank_logs:
                    rank_logs[rank] = open(log_file.with_name(f"{log_file.stem}.rank{rank}.log"), "w", buffering=1)
                rank_logs[rank].write(text)
                if rank == 0 and text.startswith(PROGRESS):
                    on_progress(json.loads(text[len(PROGRESS):]))
            code = proc.wait()
        finally:
            stop(proc)
            for f in rank_logs.values():
                f.close()
    if code != 0:
        raise LaunchError(f"{module} exited with code {code}: {failure(log_file, placement)} (log: {log_file})")


def failure(log_file: Path, placement: Placement) -> str:
    """The one-line cause: which rank ended badly, on which node, and its last error line."""
    text = log_file.read_text(errors="replace")
    rank_lines = [m.group(2) for m in map(RANK_LINE.match, text.splitlines()) if m]
    detail = _last_error("\n".join(rank_lines)) if rank_lines else _last_error(text)
    dead = BAD_TERMINATION.search(text)
    if not dead:
        return detail
    pid, host, code = dead.groups()
    ranks = {p: int(r) for r, p in RANK_PID.findall(text)}
    if pid in ranks:
        rank = ranks[pid]
        who, node = f"rank {rank} (pid {pid})", placement.ranks()[rank]["node_id"]
    else:
        who, node = f"a rank (pid {pid})", host
    # Hydra reports a rank killed by a signal with the signal's number as its exit code.
    return f"{who} on node {node} ended with exit code {code}" + (f": {detail}" if rank_lines else "")


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


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:300]
