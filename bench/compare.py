"""Regression check: compare a candidate results file with a baseline, metric by metric.

    python -m bench.compare BASELINE [CANDIDATE] [--threshold METRIC=VALUE ...] [--relative-scale X] [--raw]

Every metric of bench.schema.METRICS found in either file gets a row. A metric regresses when it
moves in its worse direction by more than its threshold: by difference for absolute metrics (AUC),
by ratio to the baseline for relative ones (speeds, times). Moving as far in the better direction is
reported as "better"; smaller moves either way are noise ("ok").

Speeds and times are also compared normalised by each run's own measured machine
(machine.measured): throughputs divided by the GEMM rate they scale with, times multiplied by it
(bench.schema.MachineFigure), so that a slower machine does not read as slower code. When both
files have machine.measured the normalised change decides the verdict, otherwise the raw one;
--raw makes the raw change decide always. The table shows both and which one decided.

Repeated runs (REPEAT=N, results["repeats"]) record how far each timed metric spread over the runs.
A change past its threshold but no larger than the larger spread of the two files is not called a
regression (nor an improvement): its verdict is "within spread", which does not fail. Relative
changes are set against the relative spread (max - min) / median, absolute ones against max - min.
A file's figure is the median of its runs; --best compares the best of them instead (the highest
throughput, the lowest time): on a shared machine interference only ever slows a run down, so the
best of a few runs is the steadiest estimate of what the code can do.

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

from bench.schema import METRICS, MachineFigure, Metric, number_at, validate, value_at

OK, BETTER, REGRESSION, WITHIN_SPREAD = "ok", "better", "REGRESSION", "within spread"
MISSING, SKIPPED = "missing", "skipped"
VERDICT_STYLES = {OK: "", BETTER: "green", REGRESSION: "bold red", WITHIN_SPREAD: "cyan", MISSING: "yellow",
                  SKIPPED: "dim"}
RAW, NORMALISED = "raw", "normalised"  # which change decided a verdict


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
    note: str = ""  # why a metric is missing or skipped, or not normalised although the files were measured
    # The change of the figures per unit of the machine figure they scale with; None when the metric does
    # not scale with the machine or a file lacks the figure.
    normalised_change: float | None = None
    decided_by: str = RAW  # RAW or NORMALISED: the change the verdict is (or, missing or skipped, would be) of
    # The larger spread of the two files' repeated runs, in the change's terms (see ``spread``); None: single runs.
    spread: float | None = None


def unmeasured(baseline: dict, candidate: dict) -> list[str]:
    """The roles ("baseline", "candidate") whose file has no machine.measured: their changes cannot be normalised."""
    return [role for role, results in (("baseline", baseline), ("candidate", candidate))
            if not isinstance(value_at(results, "machine.measured"), dict)]


def machine_figure(results: dict, figure: MachineFigure) -> tuple[str, float | None]:
    """The figure's dotted path under machine.measured (precision filled in), and its value if present and > 0."""
    precision = value_at(results, figure.precision_at) if figure.precision_at else None
    path = figure.path.format(precision=precision if isinstance(precision, str) else "fp32")
    value = number_at(results, f"machine.measured.{path}")
    return path, value if value is not None and value > 0 else None


def normalised(metric: Metric, value: float, per: float) -> float:
    """``value`` per unit of machine figure ``per``: a throughput divided by it, a time multiplied by it."""
    return value / per if metric.better == "higher" else value * per


def change(metric: Metric, baseline: float, candidate: float) -> float:
    """Signed change from baseline to candidate: a difference or a ratio, as the metric's kind says."""
    if metric.kind == "absolute":
        return candidate - baseline
    if baseline == 0:
        return 0.0 if candidate == 0 else math.copysign(math.inf, candidate)
    return (candidate - baseline) / baseline


def spread(results: dict, path: str, metric: Metric) -> float | None:
    """How far the metric moved over the file's repeated runs, in the terms of its change: the relative
    spread (max - min) / median for relative metrics, max - min for absolute ones; None for a single run."""
    repeats = results.get("repeats")
    if not isinstance(repeats, dict) or repeats["n"] < 2 or path not in repeats["metrics"]:
        return None
    record = repeats["metrics"][path]
    return record["spread"] if metric.kind == "relative" else record["max"] - record["min"]


def figure(results: dict, path: str, metric: Metric, best: bool = False) -> float | None:
    """The file's value of a metric (with repeated runs, their median); with ``best``, the best of its
    repeated runs (the file's value when it has none)."""
    record = (results.get("repeats") or {}).get("metrics", {}).get(path) if best else None
    if record is None:
        return number_at(results, path)
    return record["max"] if metric.better == "higher" else record["min"]


def larger_spread(baseline: dict, candidate: dict, path: str, metric: Metric) -> float | None:
    spreads = [s for s in (spread(baseline, path, metric), spread(candidate, path, metric)) if s is not None]
    return max(spreads) if spreads else None


def _beyond(amount: float, threshold: float) -> bool:
    # 0.789 - 0.787 is 0.0020000000000000018: a move of exactly the threshold must still pass.
    return amount > threshold and not math.isclose(amount, threshold, rel_tol=1e-9, abs_tol=1e-12)


def verdict(metric: Metric, delta: float, threshold: float, measured_spread: float | None = None) -> str:
    """ok, better or REGRESSION for a change of ``delta`` (as returned by ``change``); within spread
    for a change past the threshold that the repeated runs' ``measured_spread`` cannot tell from noise."""
    if measured_spread is not None and _beyond(abs(delta), threshold) and not _beyond(abs(delta), measured_spread):
        return WITHIN_SPREAD
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


def _normalised_change(metric: Metric, baseline: dict, candidate: dict, base: float, cand: float,
                       ) -> tuple[float | None, str]:
    """The change per unit of the machine figure the metric scales with, or None and why not (empty:
    the metric does not scale with the machine, or a file has no machine.measured at all)."""
    if metric.scales_with is None or unmeasured(baseline, candidate):
        return None, ""
    (base_path, base_per), (cand_path, cand_per) = (machine_figure(baseline, metric.scales_with),
                                                    machine_figure(candidate, metric.scales_with))
    lacking = [f"{path} in {role}" for role, path, per in (("baseline", base_path, base_per),
                                                           ("candidate", cand_path, cand_per)) if per is None]
    if lacking:
        return None, f"raw: no machine.measured.{' or '.join(lacking)}"
    note = f"per {base_path} vs {cand_path}" if base_path != cand_path else ""  # e.g. fp32 vs bf16 training
    return change(metric, normalised(metric, base, base_per), normalised(metric, cand, cand_per)), note


def compare(baseline: dict, candidate: dict, thresholds: Mapping[str, float], raw: bool = False,
            best: bool = False) -> list[Row]:
    """One row per METRICS entry present in either file; ``thresholds`` overrides the METRICS defaults;
    ``best``: each file's best repeated run rather than their median (see ``figure``).

    A row's verdict is of its normalised change when there is one, unless ``raw``; else of its raw change,
    and within spread when that change is past the threshold but not past the repeated runs' spread.
    """
    default_by = RAW if raw or unmeasured(baseline, candidate) else NORMALISED
    rows = []
    for path, metric in METRICS.items():
        base, cand = figure(baseline, path, metric, best), figure(candidate, path, metric, best)
        if base is None and cand is None:
            continue
        threshold = thresholds.get(path, metric.threshold)
        by = default_by if metric.scales_with is not None else RAW
        measured_spread = larger_spread(baseline, candidate, path, metric)
        if base is None or cand is None:
            delta, norm, result, note = None, None, MISSING, f"not in {'baseline' if base is None else 'candidate'}"
        else:
            delta = change(metric, base, cand)
            norm, norm_note = _normalised_change(metric, baseline, candidate, base, cand)
            if norm is None:
                by = RAW
            skipped = not_comparable(path, baseline, candidate)
            note = skipped or norm_note
            result = SKIPPED if skipped else verdict(metric, norm if by == NORMALISED else delta, threshold,
                                                     measured_spread)
        rows.append(Row(path, metric.unit, metric.kind, base, cand, delta, threshold, result, note,
                        normalised_change=norm, decided_by=by, spread=measured_spread))
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


def _change(row: Row, form: str = RAW) -> str:
    value = row.normalised_change if form == NORMALISED else row.change
    if value is None:
        return "-"
    # round() then + 0.0: a change of -1e-17 (float noise of a normalisation) shows as +0.0%, not -0.0%.
    return f"{round(value, 4) + 0.0:+.4f}" if row.kind == "absolute" else f"{round(value, 3) + 0.0:+.1%}"


def _decided_change(row: Row) -> str:
    """The change the verdict is of, saying which form it is when there are two."""
    if row.normalised_change is None:
        return _change(row)
    other = RAW if row.decided_by == NORMALISED else NORMALISED
    return f"{_change(row, row.decided_by)} {row.decided_by} ({_change(row, other)} {other})"


def _threshold(row: Row) -> str:
    return f"{row.threshold:g}" if row.kind == "absolute" else f"{row.threshold * 100:g}%"


def _spread(row: Row) -> str:
    if row.spread is None:
        return "-"
    return f"{row.spread:.4f}" if row.kind == "absolute" else f"{row.spread:.1%}"


def repeat_counts(baseline: dict, candidate: dict) -> str | None:
    """"baseline 5 runs, candidate 1 run" when either file holds repeated runs, else None."""
    counts = {role: results["repeats"]["n"] if "repeats" in results else 1
              for role, results in (("baseline", baseline), ("candidate", candidate))}
    if max(counts.values()) < 2:
        return None
    return ", ".join(f"{role} {n} run{'s' if n > 1 else ''}" for role, n in counts.items())


def table(rows: list[Row], title: str) -> Table:
    """The comparison as a rich table."""
    out = Table(title=title)
    out.add_column("metric", no_wrap=True)
    out.add_column("unit")
    for name in ("baseline", "candidate", "change", "normalised", "threshold", "spread"):
        out.add_column(name, justify="right")
    out.add_column("by")  # which change decided the verdict
    out.add_column("verdict")
    for row in rows:
        shown = f"{row.verdict} ({row.note})" if row.note else row.verdict
        out.add_row(row.metric, row.unit, _number(row.baseline, row.unit), _number(row.candidate, row.unit),
                    _change(row), _change(row, NORMALISED), _threshold(row), _spread(row),
                    "-" if row.verdict in (MISSING, SKIPPED) else row.decided_by,
                    Text(shown, style=VERDICT_STYLES[row.verdict]))
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
    parser.add_argument("--raw", action="store_true",
                        help="judge the raw changes even when both files have machine.measured "
                             "(by default speeds and times are judged per unit of the measured machine)")
    parser.add_argument("--best", action="store_true",
                        help="compare the best of each file's repeated runs (REPEAT=N) instead of their median")
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

    rows = compare(baseline, candidate, effective_thresholds(dict(args.threshold), args.relative_scale), raw=args.raw,
                   best=args.best)
    console = Console()
    if not console.is_terminal:
        console.width = 180  # logs and pipes have no width; rich's 80-column default would cut the numbers
    console.print(table(rows, f"{baseline['run_id']} (baseline) -> {candidate['run_id']} (candidate)"))
    if baseline["profile"] != candidate["profile"]:
        console.print(Text(f"note: the profiles differ ({baseline['profile']} vs {candidate['profile']}); "
                           "figures of different scales are compared"))
    if lacking := unmeasured(baseline, candidate):
        console.print(Text(f"note: no machine.measured in the {' and '.join(lacking)}: "
                           "verdicts use raw changes, which move with the machine as well as the code"))
    elif args.raw:
        console.print(Text("note: --raw: verdicts use raw changes, not those normalised by the measured machines"))
    if counts := repeat_counts(baseline, candidate):
        console.print(Text(f"note: repeated runs ({counts}): a change past its threshold but within the larger "
                           "spread of the two files' runs is not a regression"))
        if args.best:
            console.print(Text("note: --best: each file's best repeated run is compared, not their median"))
    for row in rows:
        if row.verdict == WITHIN_SPREAD:
            console.print(Text(f"within spread: {row.metric} {_decided_change(row)} "
                               f"(threshold {_threshold(row)}, spread {_spread(row)})"))
    failures = [f"{row.metric} regressed: {_decided_change(row)} (threshold {_threshold(row)})"
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
