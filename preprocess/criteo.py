"""The Criteo 1 TB click logs: which days a run uses, downloaded when missing.

The days are ``day_0`` .. ``day_23``; like the original workflow, training
uses the first ``days`` days (0-3 in the small profile, 0-22 in the full one)
and day 23 evaluates. Days already in ``<DATA_DIR>/criteo`` are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.config import DataConfig
from preprocess import download
from preprocess.layout import day_file

EVAL_DAY = 23


def raw_dir(cfg: DataConfig) -> Path:
    return Path(cfg.dir) / "criteo"


def dataset(cfg: DataConfig, progress: Callable[[int], None] | None = None) -> tuple[Path, dict]:
    """Make sure the chosen days are on disk, uncompressed; return their folder and manifest."""
    raw = raw_dir(cfg)
    train_days = list(range(cfg.days))
    missing = [d for d in [*train_days, EVAL_DAY] if not day_file(raw, d).is_file()]
    if missing:
        raw.mkdir(parents=True, exist_ok=True)
        for gz in download.download_days(missing, raw, progress=progress):
            day = int(gz.name.removeprefix("day_").removesuffix(".gz"))
            download.decompress_day(gz, day_file(raw, day))
    return raw, {"source": "criteo", "format": "criteo-tsv", "train_days": train_days, "eval_day": EVAL_DAY}
