"""One run's HTML report: plots of its stages, training and inference, and the tables behind them.

    python -m bench.report results/latest.json

writes ``results/runs/<run id>/report.html``. The page is one self-contained file (PNG plots
embedded as data URIs, inline CSS, no scripts), so it opens from anywhere, offline, and can be
attached to a CI run or an issue as it is. Under each plot a table gives the numbers it draws,
so the figures can be read exactly and searched.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

# Agg renders without a display; Figure + FigureCanvasAgg (not pyplot) keeps no global figure state
# in the pipeline process that calls this.
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter, StrMethodFormatter

from bench.fsutil import atomic_write_text, read_json
from bench.schema import value_at

REPORT_NAME = "report.html"

Cell = object  # anything fmt() renders
Row = Sequence[Cell]

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
img { max-width: 100%; }
.note { background: #fff6d5; padding: 0.4em 0.8em; border-left: 4px solid #e0b000; }
.status-succeeded { color: #176f2c; } .status-failed, .status-interrupted { color: #b00020; }
"""


def fmt(value: Cell) -> str:
    """The one number format of every table, so a figure reads the same wherever it appears."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4g}"  # AUCs and losses: four significant digits (regressions gate at 0.002)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def table(rows: Iterable[Row], header: Sequence[str] | None = None, caption: str | None = None) -> str:
    """An HTML table; numbers right-aligned. Every cell is escaped."""
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = (
            f'<td class="num">{html.escape(fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{html.escape(fmt(c))}</td>"
            for c in row
        )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def flatten(obj: dict, prefix: str = "") -> list[tuple[str, Cell]]:
    """Nested dicts as (dotted key, leaf) rows; lists stay whole (fmt shows them as JSON)."""
    rows: list[tuple[str, Cell]] = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def png_data_uri(fig: Figure) -> str:
    """Render ``fig`` with Agg and return it as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image(fig: Figure, alt: str) -> str:
    return f'<img src="{png_data_uri(fig)}" alt="{html.escape(alt)}">'


def _figure(columns: int) -> tuple[Figure, list[Axes]]:
    """A page-wide figure of ``columns`` plots side by side."""
    fig = Figure(figsize=(10.4, 3.6), dpi=100, layout="constrained")
    return fig, list(fig.subplots(1, columns, squeeze=False)[0])


def _floats(points: list[dict], key: str) -> list[float]:
    """One column of a list of records as floats; a missing or null value is NaN, which matplotlib leaves out."""
    return [math.nan if p.get(key) is None else float(p[key]) for p in points]


# --- (a) stage timeline ----------------------------------------------------------------------------

def timeline_rows(results: dict) -> list[tuple[str, float, float, bool | None]]:
    """(stage, start s, seconds, reused) in run order.

    Stages run one after another, so a stage starts where the stages before it end; the gaps between
    them (engine start-up outside any stage) are not recorded, so a start is the earliest it can be.
    """
    rows = []
    start = 0.0
    for name, record in (results.get("stages") or {}).items():
        seconds = float(record.get("seconds") or 0.0)
        rows.append((name, round(start, 3), seconds, record.get("reused")))
        start += seconds
    return rows


def timeline_figure(rows: list[tuple[str, float, float, bool | None]], total: float | None) -> Figure:
    fig, (ax,) = _figure(1)
    labels = [f"{name} (reused)" if reused else name for name, _, _, reused in rows]
    ax.barh(range(len(rows)), [r[2] for r in rows], left=[r[1] for r in rows], color="tab:blue")
    for i, (_, start, seconds, _) in enumerate(rows):
        ax.annotate(f"{seconds:.1f} s", (start + seconds, i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()  # first stage on top, like a Gantt chart
    end = max(rows[-1][1] + rows[-1][2], total or 0.0)
    ax.set_xlim(0, end * 1.08 or 1.0)  # room for the last bar's label
    if total:
        ax.axvline(total, color="gray", linestyle="--", label=f"run wall time {total:.1f} s")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("seconds since the first stage started")
    ax.set_title("Stage timeline")
    return fig


def timeline_section(results: dict) -> str:
    rows = timeline_rows(results)
    if not rows:
        return note("No stage ran in this run.")
    total = value_at(results, "total_seconds")
    return "\n".join([
        image(timeline_figure(rows, total), "stage timeline"),
        table([(name, start, seconds, round(start + seconds, 3), reused) for name, start, seconds, reused in rows],
              ["stage", "start s", "seconds", "end s", "reused"], "Stage times"),
    ])


# --- (b) training loss and AUC ---------------------------------------------------------------------

def training_figure(curve: list[dict], train: dict, evaluate: dict) -> Figure:
    """Loss and AUC against samples seen; the final test AUC and the oracle's as reference marks."""
    fig, (loss_ax, auc_ax) = _figure(2)
    if curve:
        samples = _floats(curve, "samples")
        loss_ax.plot(samples, _floats(curve, "loss"), marker=".", label="training loss")
        auc_ax.plot(samples, _floats(curve, "auc"), marker=".", label="AUC during training")
    elif train.get("final_loss") is not None:
        loss_ax.plot([train.get("samples") or 0], [train["final_loss"]], "o", label="final training loss")
    end = float(train.get("samples") or (_floats(curve, "samples")[-1] if curve else 0))
    if evaluate.get("auc") is not None:
        auc_ax.plot([end], [evaluate["auc"]], "s", color="tab:green", label=f"test AUC {evaluate['auc']:.4f}")
    if evaluate.get("oracle_auc") is not None:
        auc_ax.axhline(evaluate["oracle_auc"], color="gray", linestyle="--",
                       label=f"oracle AUC {evaluate['oracle_auc']:.4f}")
    for ax, title in ((loss_ax, "Training loss"), (auc_ax, "AUC")):
        ax.set_xlim(left=0)  # a lone final point sits at the end of training, not mid-axis
        ax.set_xlabel("training samples")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def training_section(results: dict) -> str:
    train = value_at(results, "stages.train") or {}
    evaluate = value_at(results, "stages.evaluate") or {}
    if not train and not evaluate:
        return note("Training did not run in this run.")
    curve = train.get("auc_curve") or []
    if not curve and train.get("final_loss") is None and evaluate.get("auc") is None:
        return note("Training did not finish in this run: it has no loss or AUC to plot.")
    parts = []
    if not curve:
        parts.append(note("This run recorded no training curve (stages.train.auc_curve): "
                          "the plot shows the final loss and test AUC only."))
    parts.append(image(training_figure(curve, train, evaluate), "training loss and AUC"))
    if curve:
        parts.append(table([(p.get("step"), p.get("samples"), p.get("auc"), p.get("loss")) for p in curve],
                           ["step", "samples", "AUC", "loss"], "Training curve"))
    parts.append(table([
        ("training samples", train.get("samples")),
        ("final training loss", train.get("final_loss")),
        ("test AUC", evaluate.get("auc")),
        ("oracle AUC", evaluate.get("oracle_auc")),
    ], ["figure", "value"], "Final figures"))
    ranks = rank_rows(train)
    if ranks:
        parts.append(table(ranks, ["rank", "sharded tables", "sharded rows", "peak memory", "estimated memory"],
                           "Per rank: embedding tables held (the replicated ones are on every rank) and memory"))
    return "\n".join(parts)


def rank_rows(train: dict) -> list[Row]:
    """One row per training rank: the tables it owns, its peak RSS and the memory estimate."""
    peaks = train.get("peak_rss_bytes") or []
    estimates = train.get("memory_estimate_bytes") or []
    plan = (train.get("sharding") or {}).get("ranks") or []
    rows = []
    for r, peak in enumerate(peaks):
        owned = plan[r] if r < len(plan) else {}
        estimate = (estimates[r] or {}).get("total") if r < len(estimates) else None
        rows.append((r, owned.get("tables"), owned.get("rows"), _mib(peak), _mib(estimate)))
    return rows


def _mib(size: object) -> str | None:
    return f"{size / 2**20:,.0f} MiB" if isinstance(size, (int, float)) else None


# --- (c) inference batch-size sweep ----------------------------------------------------------------

def sweep_points(inference: dict) -> list[dict]:
    """The sweep's points; without a sweep, the run's one measured batch size as a single point."""
    if inference.get("sweep"):
        return sorted(inference["sweep"], key=lambda p: p["batch_size"])
    if inference.get("samples_per_s") is not None:
        return [{key: inference.get(key) for key in ("batch_size", "samples_per_s", "latency_ms")}]
    return []


def sweep_figure(points: list[dict]) -> Figure:
    fig, (rate_ax, latency_ax) = _figure(2)
    sizes = _floats(points, "batch_size")
    rate_ax.plot(sizes, _floats(points, "samples_per_s"), marker="o")
    latencies = [p.get("latency_ms") or {} for p in points]
    for quantile in ("p50", "p99"):
        latency_ax.plot(sizes, _floats(latencies, quantile), marker="o", label=quantile)
    latency_ax.legend(fontsize=8)
    for ax, title, unit in ((rate_ax, "Inference throughput", "samples/s"), (latency_ax, "Batch latency", "ms")):
        ax.set_xscale("log", base=2)  # sweeps double the batch size
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 2048, not 2^11
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,g}"))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_title(title)
    return fig


def sweep_section(results: dict) -> str:
    inference = value_at(results, "stages.inference") or {}
    points = sweep_points(inference)
    if not points:
        return note("Inference did not run in this run.")
    parts = []
    if not inference.get("sweep"):
        parts.append(note("This run recorded no batch-size sweep (stages.inference.sweep): "
                          "the plot shows its one measured batch size."))
    parts.append(image(sweep_figure(points), "inference throughput and latency by batch size"))
    parts.append(table(
        [(p.get("batch_size"), p.get("samples_per_s"), value_at(p, "latency_ms.p50"), value_at(p, "latency_ms.p99"))
         for p in points],
        ["batch size", "samples/s", "p50 latency ms", "p99 latency ms"], "Inference by batch size"))
    return "\n".join(parts)


# --- (d) tables ------------------------------------------------------------------------------------

# (label, dotted path in the results file, unit)
SUMMARY = [
    ("test AUC", "stages.evaluate.auc", ""),
    ("oracle AUC (synthetic data's true click model)", "stages.evaluate.oracle_auc", ""),
    ("AUC gap to oracle", "stages.evaluate.auc_gap", ""),
    ("test log loss", "stages.evaluate.logloss", ""),
    ("test accuracy", "stages.evaluate.accuracy", ""),
    ("training throughput", "stages.train.samples_per_s", "samples/s"),
    ("training roofline fraction (GEMM rate sampled during training)", "stages.train.roofline_fraction", ""),
    ("training GEMM rate sampled during training, all ranks", "stages.train.gemm_in_run.machine_gflops", "GFLOP/s"),
    ("training roofline fraction (best GEMM probe)", "stages.train.roofline_fraction_best_probe", ""),
    ("loader throughput / training throughput", "stages.train.loader.ratio_to_training", ""),
    ("training final loss", "stages.train.final_loss", ""),
    ("data generation", "stages.data.rows_per_s", "rows/s"),
    ("preprocessing (Spark job)", "stages.preprocess.rows_per_s", "rows/s"),
    ("preprocessing per core", "stages.preprocess.rows_per_s_per_core", "rows/s"),
    ("preprocessing parse floor (pyarrow CSV)", "stages.preprocess.parse_floor_rows_per_s", "rows/s"),
    ("inference throughput", "stages.inference.samples_per_s", "samples/s"),
    ("inference latency p50", "stages.inference.latency_ms.p50", "ms"),
    ("inference latency p99", "stages.inference.latency_ms.p99", "ms"),
    ("inference batch size", "stages.inference.batch_size", ""),
    ("inference roofline fraction (best batch size)", "stages.inference.roofline_fraction", ""),
    ("inference GEMM rate sampled around that batch size, all ranks", "stages.inference.gemm_gflops", "GFLOP/s"),
    ("inference roofline fraction (best GEMM probe)", "stages.inference.roofline_fraction_best_probe", ""),
    ("run wall time", "total_seconds", "s"),
]


def summary_section(results: dict) -> str:
    rows = [(label, value_at(results, path), unit) for label, path, unit in SUMMARY if value_at(results, path) is not None]
    return table(rows, ["figure", "value", "unit"])


def environment_section(results: dict) -> str:
    machine = dict(results.get("machine") or {})
    if machine.get("memory_bytes") is not None:
        machine["memory"] = f"{machine.pop('memory_bytes') / 2**30:.1f} GiB"
    cluster = dict(results.get("cluster") or {})
    placement = cluster.pop("placement", None) or []
    parts = [
        table(flatten(machine), caption="Machine"),
        table(flatten(results.get("software") or {}), caption="Software"),
        table(flatten(cluster), caption="Cluster"),
    ]
    if placement:
        parts.append(table([(r.get("rank"), r.get("node_id"), r.get("ip"), r.get("cores")) for r in placement],
                           ["rank", "node", "ip", "cores"], "Placement of the training ranks"))
    return "\n".join(parts)


def header_section(results: dict) -> str:
    status = str(results.get("status"))
    sha = value_at(results, "git.sha")
    rows = [
        ("run", results.get("run_id")), ("profile", results.get("profile")), ("status", status),
        ("started", results.get("started_at")), ("finished", results.get("finished_at")),
        ("git", f"{sha}{' (uncommitted changes)' if value_at(results, 'git.dirty') else ''}" if sha else None),
    ]
    parts = [f'<h1>DLRM benchmark run {html.escape(str(results.get("run_id")))} '
             f'<span class="status-{html.escape(status)}">{html.escape(status)}</span></h1>',
             table(rows)]
    if results.get("error"):
        parts.append(note(f"error: {results['error']}"))
    return "\n".join(parts)


def render(results: dict) -> str:
    """The whole page as one string."""
    sections = [
        header_section(results),
        "<h2>Summary</h2>", summary_section(results),
        "<h2>Stage timeline</h2>", timeline_section(results),
        "<h2>Training</h2>", training_section(results),
        "<h2>Inference</h2>", sweep_section(results),
        "<h2>Dataset</h2>", table(flatten(results.get("dataset") or {})),
        "<h2>Environment</h2>", environment_section(results),
        "<h2>Configuration</h2>", table(flatten(results.get("config") or {}), ["setting", "value"]),
    ]
    title = html.escape(f"DLRM run {results.get('run_id')}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n")


def write_report(results: dict, run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path."""
    path = Path(run_dir) / REPORT_NAME
    atomic_write_text(path, render(results))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results JSON, e.g. results/latest.json")
    parser.add_argument("--run-dir", type=Path,
                        help="where to write report.html (default: runs/<run id>/ beside the results file)")
    args = parser.parse_args(argv)
    try:
        results = read_json(args.results)
    except (OSError, ValueError) as err:
        print(f"error: cannot read {args.results}: {err}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or args.results.parent / "runs" / str(results.get("run_id"))
    print(write_report(results, run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
