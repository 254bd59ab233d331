"""Launch ranks with MPI (the venv's MPICH ``mpiexec``, or Intel MPI / Open MPI) on the nodes a placement reserved."""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from bench.cluster import Placement

REPO = Path(__file__).resolve().parent.parent
PROGRESS = "PROGRESS "


class LaunchError(RuntimeError):
    """The ranks failed; the message names the log file to read."""


@dataclass(frozen=True)
class Mpi:
    """An MPI launcher: its mpiexec and the family its command line follows."""

    mpiexec: str
    family: Literal["hydra", "openmpi"]  # hydra: MPICH and Intel MPI
    version: str


def find_mpi(path: str | None = None) -> Mpi:
    """``path``'s mpiexec, else the venv's (MPICH from requirements.txt), else one on PATH; its family from --version."""
    local = Path(sys.executable).parent / "mpiexec"
    found = path or (str(local) if local.exists() else shutil.which("mpiexec"))
    if not found or not Path(found).exists():
        raise LaunchError(f"mpiexec not found{f' at {path}' if path else ''}; run `make setup` "
                          "(requirements.txt installs mpich) or name one with MPIEXEC=")
    out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    if "Open MPI" in text:
        match = re.search(r"Open MPI\)? ([\d.]+)", text)
        return Mpi(found, "openmpi", f"Open MPI {match.group(1) if match else 'unknown'}")
    if "Intel(R) MPI" in text:  # Intel MPI's mpiexec is Hydra too, with MPICH's options
        match = re.search(r"Version ([\w.]+)", text)
        return Mpi(found, "hydra", f"Intel MPI {match.group(1) if match else 'unknown'}")
    if "HYDRA" in text:
        versions = re.findall(r"Version:\s*(\S+)", text)
        return Mpi(found, "hydra", f"MPICH {versions[0] if versions else 'unknown'}")
    raise LaunchError(f"{found} is neither MPICH/Intel MPI (Hydra) nor Open MPI; `{found} --version` said: "
                      f"{' '.join(text.split())[:120]}")


def free_port() -> int:
    """A TCP port no local address has in use now. Checked on every address, as torch's store listens:
    a port free on 127.0.0.1 was taken on the simulated nodes' address in one run (EADDRINUSE)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def command(placement: Placement, ranks_per_node: int, module: str, args: list[str], env: dict[str, str],
            agent: Path | None = None, mpi: Mpi | None = None) -> list[str]:
    """The mpiexec command line: ranks packed node by node, each output line tagged with its rank,
    environment passed to every rank.

    How mpiexec starts its daemon (Hydra's proxy, Open MPI's prted) on each node: through ``agent``
    (bench.mpi_agent: a Ray actor on the node; the hosts are Ray node ids) when given, else locally
    on a single node, else ssh to the IPs.
    """
    mpi = mpi or find_mpi()
    world = ranks_per_node * len(placement.nodes)
    if agent is not None:
        hosts = [n["node_id"] for n in placement.nodes]
    elif len(placement.nodes) == 1:
        hosts = ["localhost"]
    else:
        hosts = placement.hosts
    host_list = ",".join(f"{h}:{ranks_per_node}" for h in hosts)
    if mpi.family == "openmpi":
        cmd = [mpi.mpiexec, "-n", str(world), "--map-by", f"ppr:{ranks_per_node}:node", "--tag-output",
               "--host", host_list]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")  # containers often run as root; Open MPI refuses without it
        if agent is not None:
            cmd += ["--prtemca", "plm_ssh_agent", str(agent)]
        for key, value in env.items():
            cmd += ["-x", f"{key}={value}"]
    else:
        cmd = [mpi.mpiexec, "-n", str(world), "-ppn", str(ranks_per_node), "-prepend-rank"]
        if agent is not None:
            cmd += ["-launcher", "ssh", "-launcher-exec", str(agent), "-hosts", host_list]
        elif len(placement.nodes) == 1:
            cmd += ["-launcher", "fork"]  # one node: Hydra forks the proxy locally
        else:
            cmd += ["-launcher", "ssh", "-hosts", host_list]
        for key, value in env.items():
            cmd += ["-genv", key, value]
    return cmd + [sys.executable, "-m", module, *args]


# Hydra's -prepend-rank "[r] ", Open MPI's --tag-output "[job,r]<stdout>: ".
RANK_LINE = re.compile(r"^\[(?:\d+,)?(\d+)\](?:<std(?:out|err)>:)? ?(.*)$", re.S)
STRAY_PREFIX = re.compile(r"\[\d+\] (?=\n?$)")  # a prefix Hydra put before a newline written on its own
RANK_PID = re.compile(r": rank (\d+) of \d+: pid (\d+)")  # dlrm.runner.start's first line
# A rank's own failure: dlrm.runner's one line ("prog: rank r: error: ...") or an exception's last line.
RANK_ERROR = re.compile(r"^(\S+: rank \d+: error: |\w*(Error|Exception)\b)")
# How Hydra and Open MPI report a rank that ended badly: its pid, host and exit code (or signal).
BAD_TERMINATION = re.compile(r"PID (\d+) RUNNING AT (\S+)\s*=\s*EXIT CODE: (\d+)"
                             r"|rank \d+ with PID (\d+) on node (\S+) exited on signal (\d+)")


# glibc malloc that keeps freed memory rather than handing it back to the kernel: tensors up to 64 MB
# come from the heap, not fresh mmaps, and the heap is not trimmed, so a step's activations reuse
# pages already faulted in. Training ranks: with glibc's defaults a small-profile rank page-faulted
# ~200 times per step, with these ~3; 500 steps ran at 36.5-37.0k samples/s against 34.8-35.3k,
# and peak RSS stayed within the default's (0.79-0.89 GB against 0.77-0.95; once 1.66 GB).
KEEP_FREED_MEMORY = [f"glibc.malloc.mmap_threshold={64 << 20}", f"glibc.malloc.trim_threshold={1 << 30}"]
TRAINING_MALLOC = {"GLIBC_TUNABLES": ":".join(KEEP_FREED_MEMORY)}
# Serving ranks also back the heap with transparent huge pages. With glibc's defaults some processes
# re-faulted each batch's activations (~300 page faults per 512-row forward of the tiny model); with
# these settings none did, and ten processes in a row ran that forward in 0.55-0.56 ms against
# 0.58-0.69 ms with the defaults. (Training gained nothing from the huge pages.)
SERVING_MALLOC = {"GLIBC_TUNABLES": ":".join(["glibc.malloc.hugetlb=1", *KEEP_FREED_MEMORY])}


def run(
    placement: Placement,
    ranks_per_node: int,
    module: str,
    args: list[str],
    log_file: Path,
    threads_per_rank: int,
    on_progress: Callable[[dict], None] = lambda p: None,
    agent: Path | None = None,
    mpi: Mpi | None = None,
    extra_env: dict[str, str] | None = None,
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
        **(extra_env or {}),
    }
    cmd = command(placement, ranks_per_node, module, args, env, agent, mpi)
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
    rank_lines = [(int(m.group(1)), m.group(2).strip()) for m in map(RANK_LINE.match, text.splitlines()) if m]
    errors = [(rank, line) for rank, line in rank_lines if RANK_ERROR.match(line)]
    dead = BAD_TERMINATION.search(text)
    if not dead:
        return errors[0][1] if errors else _last_error(text)
    hydra = dead.group(1) is not None
    pid, host, code = dead.groups()[:3] if hydra else dead.groups()[3:]
    ranks = {p: int(r) for r, p in RANK_PID.findall(text)}
    rank = ranks.get(pid)
    if rank is not None:
        who, node = f"rank {rank} (pid {pid})", placement.ranks()[rank]["node_id"]
    else:
        who, node = f"a rank (pid {pid})", host
    own = [line for r, line in errors if r == rank]  # not the errors it caused on the others
    # Hydra reports a rank killed by a signal with the signal's number as its exit code.
    how = f"exit code {code}" if hydra else f"signal {code}"
    return f"{who} on node {node} ended with {how}" + (f": {own[0]}" if own else "")


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
