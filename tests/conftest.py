"""Shared fixtures: a local Spark session, an engine environment, and small Criteo-format files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import cluster
from bench.config import resolve


@pytest.fixture(scope="session")
def engine_env() -> None:
    os.environ.update(cluster.engine_environment(dict(os.environ)))


@pytest.fixture(scope="session")
def local_spark(engine_env, tmp_path_factory):
    cfg = resolve("tiny", ["preprocess.engine=local"]).preprocess
    with cluster.spark_session(cfg, tmp_path_factory.mktemp("spark-scratch")) as spark:
        yield spark


def criteo_line(label: int, ints: list[str], cats: list[str]) -> str:
    assert len(ints) == 13 and len(cats) == 26
    return "\t".join([str(label), *ints, *cats]) + "\n"


def write_day(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines))
    return path
