"""REPEAT=N: the timed stages run N times; the results keep each metric's median and its spread.

One run of a timed stage on a shared machine says little; N runs give a median to compare and a
spread (max - min, relative to the median) that bench.compare will not call a regression within.
The results file then holds the median as each repeated metric's value and, under ``repeats``:

    {"n": N, "metrics": {"stages.train.samples_per_s": {"values": [...], "median": m, "min": a, "max": b,
                                                          "spread": (b - a) / m}, ...}}
"""

from __future__ import annotations

import statistics

from bench.schema import METRICS, number_at

# The stages a repeat runs again (data generation is made once and reused).
REPEATED_STAGES = ("preprocess", "train", "evaluate", "inference")


def repeated_metrics() -> list[str]:
    return [path for path in METRICS if path.split(".")[0] == "stages" and path.split(".")[1] in REPEATED_STAGES]


def _set(tree: dict, dotted: str, value: float) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[last] = value


def sample(results: dict, stages: tuple[str, ...] = REPEATED_STAGES) -> dict[str, float]:
    """The repeated metrics of ``stages`` as they stand in the results now."""
    out = {}
    for path in repeated_metrics():
        value = number_at(results, path)
        if path.split(".")[1] in stages and value is not None:
            out[path] = float(value)
    return out


def summarise(samples: list[dict[str, float]]) -> dict:
    """Median, range and relative spread of every metric present in all samples."""
    common = set.intersection(*(set(s) for s in samples)) if samples else set()
    metrics = {}
    for path in sorted(common):
        values = [s[path] for s in samples]
        median = statistics.median(values)
        spread = (max(values) - min(values)) / abs(median) if median else 0.0
        metrics[path] = {"values": values, "median": median, "min": min(values), "max": max(values),
                         "spread": round(spread, 6)}
    return {"n": len(samples), "metrics": metrics}


def apply_medians(results: dict, summary: dict) -> None:
    """Each repeated metric's value in the results becomes its median."""
    for path, record in summary["metrics"].items():
        _set(results, path, record["median"])
