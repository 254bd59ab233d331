"""Shared fixtures of the micro-benchmarks (the profile, scratch space), and the table of their
throughput figures (throughput.py) printed at the end of the run."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.config import Config, resolve
from throughput import FIGURES, show


def pytest_terminal_summary(terminalreporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("throughput (from the median call)")
    for name, figures in FIGURES:
        terminalreporter.write_line(name)
        terminalreporter.write_line("    " + ", ".join(f"{k} {show(k, v)}" for k, v in figures.items()))


@pytest.fixture(scope="session")
def small() -> Config:
    """The small profile, on plain local Spark (no Ray: the benchmarks time the job, not RayDP)."""
    return resolve("small", ["preprocess.engine=local"])


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    """A folder for generated and processed data, removed at the end (hundreds of MB)."""
    folder = Path(tempfile.mkdtemp(prefix="dlrm-bench-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
