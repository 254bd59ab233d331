"""Real Criteo click logs already on disk: which day files a run uses.

The Terabyte set's days are ``day_0`` .. ``day_23``; like the original
workflow, training uses the first ``days`` days and day 23 evaluates.
"""

from __future__ import annotations

from pathlib import Path

from bench.config import DataConfig
from preprocess.layout import day_file

EVAL_DAY = 23


class DataError(RuntimeError):
    """Missing or unusable input data, reported to the user as one line."""


def local_dataset(cfg: DataConfig) -> tuple[Path, dict]:
    raw = Path(cfg.dir) / "criteo"
    if not raw.is_dir() or not any(raw.iterdir()):
        raise DataError(f"no Criteo day files in {raw}; put day_0 .. day_23 there, or use DATA=synthetic")
    train_days = list(range(cfg.days))
    missing = [day_file(raw, d).name for d in [*train_days, EVAL_DAY] if not day_file(raw, d).is_file()]
    if missing:
        raise DataError(f"missing Criteo day files in {raw}: {', '.join(missing)}")
    return raw, {"source": "criteo", "format": "criteo-tsv", "train_days": train_days, "eval_day": EVAL_DAY}
