"""The results file: one JSON per run, written atomically, also when the run fails."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import psutil

from bench import schema
from bench.fsutil import atomic_write_json

SCHEMA_VERSION = 1
REPO = Path(__file__).resolve().parent.parent


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_id(profile: str, started: str) -> str:
    return f"{profile}-{started.replace(':', '').replace('-', '')}"


def git_info() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    return {"sha": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "os": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(),
    }


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_info() -> dict:
    return {
        "python": platform.python_version(),
        **{name: package_version(name) for name in ("torch", "ray", "raydp", "pyspark", "numpy", "pyarrow", "scikit-learn")},
        "mpi": f"mpich {package_version('mpich')}" if package_version("mpich") else None,
    }


def results_path(results_dir: Path, rid: str) -> Path:
    return Path(results_dir) / f"{rid}.json"


def write(results_dir: Path, results: dict) -> Path:
    """Validate, then write ``<run id>.json`` and ``latest.json``, each atomically.

    A results file that breaks the schema is still written (a failed run must
    leave its record), but marked failed with the schema problem as its error.
    """
    try:
        schema.validate(results)
    except schema.ResultsInvalid as err:
        results["status"] = "failed"
        results["error"] = f"{results.get('error') or 'results'}; results file invalid: {err}"
    path = results_path(results_dir, results["run_id"])
    atomic_write_json(path, results)
    atomic_write_json(Path(results_dir) / "latest.json", results)
    return path
