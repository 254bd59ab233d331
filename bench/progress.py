"""What the user sees: stage headers, progress bars with rate and ETA, and the closing summary.

Engines (Ray, Spark, the JVM) write to file descriptors 1 and 2; during a run
those go to a log file, and this console keeps its own copy of the terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Task:
    """One progress bar; its methods are handed to the stages as callbacks."""

    def __init__(self, progress: Progress, task_id: int):
        self._progress, self._id = progress, task_id
        self._notes = 0

    def advance(self, n: int) -> None:
        self._progress.advance(self._id, n)

    def update(self, completed: int, total: int | None = None, info: str = "") -> None:
        self._progress.update(self._id, completed=completed, total=total, info=info)

    def note(self, text: str) -> None:
        """A new step begins: the steps before it are done."""
        self._progress.update(self._id, completed=self._notes, info=text)
        self._notes += 1


class Reporter:
    def __init__(self) -> None:
        self.console = Console(file=os.fdopen(os.dup(sys.stdout.fileno()), "w"), highlight=False)

    def stage(self, name: str) -> None:
        self.console.print(f"[bold cyan]==> {name}[/]")

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        progress = Progress(
            SpinnerColumn(), TextColumn(description), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=False,
        )
        with progress:
            yield Task(progress, progress.add_task(description, total=total, info=""))

    @contextmanager
    def redirect_output(self, log: Path) -> Iterator[None]:
        """Send whatever the engines print to ``log``; restore the terminal afterwards."""
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)

    def summary(self, results: dict, path: Path, report: Path | None = None) -> None:
        table = Table(title=f"run {results['run_id']}: {results['status']}")
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        table.add_column("figure")
        for name, rec in results["stages"].items():
            table.add_row(name, f"{rec.get('seconds', float('nan')):.1f}", _figure(name, rec))
        table.add_row("total", f"{results['total_seconds']:.1f}", "")
        self.console.print(table)
        self.console.print(f"results: {path}")
        if report:
            self.console.print(f"report:  {report}")


def _figure(name: str, rec: dict) -> str:
    reused = " (reused)" if rec.get("reused") else ""
    if name == "data" and "rows_per_s" in rec:
        return f"{rec['rows_per_s']:,.0f} rows/s generated"
    if name == "preprocess" and "rows_per_s" in rec:
        floor = f" (parse floor {rec['parse_floor_rows_per_s']:,.0f})" if rec.get("parse_floor_rows_per_s") else ""
        return f"{rec['rows_per_s']:,.0f} rows/s{floor}, {rec.get('rows_rejected', 0)} rejected{reused}"
    if name == "train" and "samples_per_s" in rec:
        return f"{rec['samples_per_s']:,.0f} samples/s{_fraction(rec)}"
    if name == "evaluate" and "auc" in rec:
        oracle = f" (oracle {rec['oracle_auc']:.4f})" if "oracle_auc" in rec else ""
        return f"AUC {rec['auc']:.4f}{oracle}, logloss {rec['logloss']:.4f}"
    if name == "inference" and "samples_per_s" in rec:
        lat = rec["latency_ms"]
        return f"{rec['samples_per_s']:,.0f} samples/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms{_fraction(rec)}"
    return reused.strip()


def _fraction(rec: dict) -> str:
    """The stage's roofline fraction (inference: its best batch size's), when it has one."""
    return f", {rec['roofline_fraction']:.2f} of the roofline" if "roofline_fraction" in rec else ""
