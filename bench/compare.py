"""Regression check: compare a candidate results file with a baseline, metric by metric.

    python -m bench.compare BASELINE [CANDIDATE] [--threshold METRIC=VALUE ...] [--relative-scale X]

Every metric of bench.schema.METRICS found in either file gets a row. A metric regresses when it
moves in its worse direction by more than its threshold: by difference for absolute metrics (AUC),
by ratio to the baseline for relative ones (speeds, times). Moving as far in the better direction is
reported as "better"; smaller moves either way are noise ("ok").

Exit status: 0 no regression; 1 a metric regressed or the candidate run did not succeed;
2 a file is unreadable or invalid, or the baseline run did not succeed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench.schema import METRICS, Metric, validate

OK, BETTER, REGRESSION, MISSING, SKIPPED = "ok", "better", "REGRESSION", "missing", "skipped"
VERDICT_STYLES = {OK: "", BETTER: "green", REGRESSION: "bold red", MISSING: "yellow", SKIPPED: "dim"}


@dataclass(frozen=True)
class Row:
    """One metric of the comparison."""

    metric: str
    unit: str
    kind: str
    baseline: float | None
    candidate: float | None
    change: float | None  # candidate - baseline (absolute) or (candidate - baseline) / baseline (relative)
    threshold: float
    verdict: str
    note: str = ""  # why a metric is missing or skipped


def lookup(results: dict, path: str) -> float | None:
    """The number at a dotted path, or None when the path is absent or null (e.g. a stage never ran)."""
    node: object = results
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def change(metric: Metric, baseline: float, candidate: float) -> float:
    """Signed change from baseline to candidate: a difference or a ratio, as the metric's kind says."""
    if metric.kind == "absolute":
        return candidate - baseline
    if baseline == 0:
        return 0.0 if candidate == 0 else math.copysign(math.inf, candidate)
    return (candidate - baseline) / baseline


def _beyond(amount: float, threshold: float) -> bool:
    # 0.789 - 0.787 is 0.0020000000000000018: a move of exactly the threshold must still pass.
    return amount > threshold and not math.isclose(amount, threshold, rel_tol=1e-9, abs_tol=1e-12)


def verdict(metric: Metric, delta: float, threshold: float) -> str:
    """ok, better or REGRESSION for a change of ``delta`` (as returned by ``change``)."""
    worse = -delta if metric.better == "higher" else delta
    if _beyond(worse, threshold):
        return REGRESSION
    if _beyond(-worse, threshold):
        return BETTER
    return OK


def _reused_stages(results: dict) -> set[str]:
    return {name for name, record in results["stages"].items() if record.get("reused")}


def not_comparable(path: str, baseline: dict, candidate: dict) -> str | None:
    """Why the two values of a metric do not measure the same work, or None if they do.

    A reused stage did not run: its figures are a cache hit's time or the cached output's old timing,
    so they say nothing about the candidate's code.
    """
    parts = path.split(".")
    if parts[0] == "stages":
        reused = [role for role, results in (("baseline", baseline), ("candidate", candidate))
                  if parts[1] in _reused_stages(results)]
        return f"{parts[1]} reused in {' and '.join(reused)}" if reused else None
    if path == "total_seconds" and _reused_stages(baseline) != _reused_stages(candidate):
        return "different stages reused"
    return None


def compare(baseline: dict, candidate: dict, thresholds: Mapping[str, float]) -> list[Row]:
    """One row per METRICS entry present in either file; ``thresholds`` overrides the METRICS defaults."""
    rows = []
    for path, metric in METRICS.items():
        base, cand = lookup(baseline, path), lookup(candidate, path)
        if base is None and cand is None:
            continue
        threshold = thresholds.get(path, metric.threshold)
        if base is None or cand is None:
            delta, result, note = None, MISSING, f"not in {'baseline' if base is None else 'candidate'}"
        else:
            delta = change(metric, base, cand)
            note = not_comparable(path, baseline, candidate) or ""
            result = SKIPPED if note else verdict(metric, delta, threshold)
        rows.append(Row(path, metric.unit, metric.kind, base, cand, delta, threshold, result, note))
    return rows


def effective_thresholds(overrides: Mapping[str, float], relative_scale: float = 1.0) -> dict[str, float]:
    """Every metric's threshold: an override as given, else the default, scaled when relative.

    The scale loosens the defaults for noisy machines; an explicit threshold is what the user asked for.
    """
    return {
        path: overrides[path] if path in overrides
        else metric.threshold * (relative_scale if metric.kind == "relative" else 1.0)
        for path, metric in METRICS.items()
    }


def status_problem(results: dict) -> str | None:
    """A one-line reason when the run did not succeed, else None."""
    if results["status"] == "succeeded":
        return None
    return f"run {results['run_id']} {results['status']}: {results['error'] or 'it did not finish'}"


def load(path: Path) -> dict:
    """Read and validate a results file; raise OSError, ValueError (bad JSON) or ResultsInvalid."""
    results = json.loads(Path(path).read_text())
    validate(results)
    return results


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "1":
        return f"{value:.4f}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _change(row: Row) -> str:
    if row.change is None:
        return "-"
    return f"{row.change:+.4f}" if row.kind == "absolute" else f"{row.change:+.1%}"


def _threshold(row: Row) -> str:
    return f"{row.threshold:g}" if row.kind == "absolute" else f"{row.threshold * 100:g}%"


def table(rows: list[Row], title: str) -> Table:
    """The comparison as a rich table."""
    out = Table(title=title)
    out.add_column("metric", no_wrap=True)
    out.add_column("unit")
    for name in ("baseline", "candidate", "change", "threshold"):
        out.add_column(name, justify="right")
    out.add_column("verdict")
    for row in rows:
        shown = f"{row.verdict} ({row.note})" if row.note else row.verdict
        out.add_row(row.metric, row.unit, _number(row.baseline, row.unit), _number(row.candidate, row.unit),
                    _change(row), _threshold(row), Text(shown, style=VERDICT_STYLES[row.verdict]))
    return out


def _threshold_arg(text: str) -> tuple[str, float]:
    metric, sep, value = text.partition("=")
    if not sep or metric not in METRICS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected METRIC=VALUE with METRIC one of {', '.join(METRICS)}")
    try:
        threshold = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None
    if not threshold >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a threshold is >= 0")
    return metric, threshold


def _scale_arg(text: str) -> float:
    try:
        scale = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not scale > 0:
        raise argparse.ArgumentTypeError("the scale is > 0")
    return scale


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path, nargs="?", default=Path("results/latest.json"))
    parser.add_argument("--threshold", type=_threshold_arg, action="append", default=[], metavar="METRIC=VALUE",
                        help="override one metric's threshold (a fraction for relative metrics); repeatable")
    parser.add_argument("--relative-scale", type=_scale_arg, default=1.0, metavar="X",
                        help="multiply every default relative threshold by X, e.g. 2 on noisy CI machines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = {}
    for role, path in (("baseline", args.baseline), ("candidate", args.candidate)):
        try:
            files[role] = load(path)
        except (OSError, ValueError) as err:  # ResultsInvalid and bad JSON are ValueErrors
            print(f"error: {role} {path}: {err}", file=sys.stderr)
            return 2
    baseline, candidate = files["baseline"], files["candidate"]
    if problem := status_problem(baseline):
        print(f"error: baseline {args.baseline}: {problem}; compare against a succeeded run", file=sys.stderr)
        return 2

    rows = compare(baseline, candidate, effective_thresholds(dict(args.threshold), args.relative_scale))
    console = Console()
    if not console.is_terminal:
        console.width = 160  # logs and pipes have no width; rich's 80-column default would cut the numbers
    console.print(table(rows, f"{baseline['run_id']} (baseline) -> {candidate['run_id']} (candidate)"))
    if baseline["profile"] != candidate["profile"]:
        console.print(Text(f"note: the profiles differ ({baseline['profile']} vs {candidate['profile']}); "
                           "figures of different scales are compared"))
    failures = [f"{row.metric} regressed: {_change(row)} (threshold {_threshold(row)})"
                for row in rows if row.verdict == REGRESSION]
    if problem := status_problem(candidate):
        failures.insert(0, f"candidate {problem}")
    # Text, not markup: error messages may hold brackets.
    for line in failures:
        console.print(Text.assemble(("FAIL", "bold red"), f" {line}"))
    if not failures:
        console.print(Text.assemble(("PASS", "green"), " no metric regressed past its threshold"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
