"""Throughput figures of the micro-benchmarks: rates from the timings, kept for the saved JSON and the summary.

``rates`` turns a benchmark's timing into ``<what>_per_s`` from the median call (robust to the odd slow
round on a shared machine); ``record`` stores figures in the benchmark's extra_info (so in the saved
JSON, next to the timings) and for the table conftest prints at the end of the run.
"""

from __future__ import annotations

from collections.abc import Mapping

FIGURES: list[tuple[str, dict[str, float]]] = []  # (benchmark name, figures) in run order


def rates(benchmark, per_call: Mapping[str, float]) -> dict[str, float]:
    """``<what>_per_s`` for every amount of work one call does, e.g. {"samples": 1024, "bytes": 3.4e6}."""
    seconds = benchmark.stats.stats.median
    return {f"{what}_per_s": amount / seconds for what, amount in per_call.items()}


def record(benchmark, figures: Mapping[str, float]) -> None:
    """Keep ``figures`` in the benchmark's extra_info and for the end-of-run table."""
    figures = {name: float(value) for name, value in figures.items()}
    benchmark.extra_info.update(figures)
    FIGURES.append((benchmark.name, figures))


def show(name: str, value: float) -> str:
    """A figure for people: fractions and ratios as they are, bytes in MiB or GB/s, flops in GFLOP/s,
    counts and rates with separators."""
    if name.endswith("fraction") or name.startswith("x_"):
        return f"{value:.3f}"
    if name.endswith("flops_per_s"):
        return f"{value / 1e9:.1f} GFLOP/s"
    if name.endswith("bytes_per_s"):
        return f"{value / 1e9:.2f} GB/s"
    if name.endswith("bytes"):
        return f"{value / 2**20:.0f} MiB"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
