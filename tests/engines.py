"""Running the real pipeline from tests, and finding engine processes it may have left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
ENGINE_PROCESSES = ("raylet", "gcs_server", "mpiexec", "hydra_pmi_proxy", "prterun", "prted", "RayDPSparkMaster",
                    "dlrm.train", "dlrm.inference", "bench.mpi_agent")


def run_pipeline(tmp: Path, *overrides: str, profile: str = "tiny") -> tuple[subprocess.CompletedProcess, dict | None]:
    args = [sys.executable, "-m", "bench.pipeline", "--profile", profile,
            "--set", f"data.dir={tmp / 'data'}", "--set", f"results_dir={tmp / 'results'}"]
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    latest = tmp / "results" / "latest.json"
    return proc, json.loads(latest.read_text()) if latest.exists() else None


def _belongs_to_another_test_run(p: psutil.Process) -> bool:
    """True for processes under some other pytest (say, a colleague's run on the same machine)."""
    for parent in p.parents():
        if parent.pid == os.getpid():
            return False
        if "pytest" in " ".join(parent.cmdline()):
            return True
    return False


def engine_processes() -> list[str]:
    """Engine processes left running by this test run: orphans or our own descendants."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        try:
            if any(name in cmd for name in ENGINE_PROCESSES) and "pytest" not in cmd and not _belongs_to_another_test_run(p):
                found.append(cmd[:120])
        except psutil.Error:  # ended while we looked
            pass
    return found
