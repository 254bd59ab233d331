"""Scaling runs: the pipeline once per node count, then a summary of training throughput per point.

    python -m bench.scaling --profile small --nodes 1,2,4 [--set section.key=value ...]

Each point is a normal run with its own results file (``cluster.nodes`` set to the point);
the data and the preprocessed output are made once and reused by the later points. The
summary (``<results_dir>/scaling-<UTC time>.json``) gives per point the training samples/s,
the speed-up over the smallest point and the scaling efficiency (speed-up / node ratio).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from bench import pipeline, results
from bench.config import ConfigError, resolve
from bench.fsutil import atomic_write_json, read_json


def node_counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"NODES={text!r} is not a comma-separated list of node counts, e.g. 1,2,4") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise ConfigError(f"NODES={text!r}: give distinct node counts of at least 1, e.g. 1,2,4")
    return sorted(counts)


def summarise(points: list[dict]) -> list[dict]:
    """Speed-up and efficiency of each point's training samples/s against the smallest successful point."""
    ok = [p for p in points if p["samples_per_s"]]
    base = ok[0] if ok else None
    for p in points:
        if base is None or not p["samples_per_s"]:
            p["speedup"] = p["efficiency"] = None
            continue
        p["speedup"] = round(p["samples_per_s"] / base["samples_per_s"], 4)
        p["efficiency"] = round(p["speedup"] / (p["nodes"] / base["nodes"]), 4)
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small")
    parser.add_argument("--nodes", required=True, help="node counts, comma-separated")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        counts = node_counts(args.nodes)
        cfg = resolve(args.profile, args.overrides)  # fail on a bad setting before the first run
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    started = results.utc_now()
    points = []
    for n in counts:
        code = pipeline.main(["--profile", args.profile, *sum((["--set", o] for o in args.overrides), []),
                              "--set", f"cluster.nodes={n}"])
        run = read_json(cfg.results_dir / "latest.json")
        points.append({
            "nodes": n, "ranks": run["cluster"]["ranks"], "status": run["status"], "results": run["run_id"],
            "samples_per_s": (run["stages"].get("train") or {}).get("samples_per_s"),
            "simulated": (run["cluster"].get("ray") or {}).get("simulated"),
        })
        if code == 130:  # interrupted: stop here, still summarise what ran
            break
    summary = {"profile": args.profile, "started_at": started, "finished_at": results.utc_now(),
               "points": summarise(points)}
    path = cfg.results_dir / f"scaling-{results.run_id(args.profile, started).split('-', 1)[1]}.json"
    atomic_write_json(path, summary)

    table = Table(title=f"scaling, profile {args.profile}")
    for col in ("nodes", "ranks", "status", "samples/s", "speed-up", "efficiency"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(str(p["nodes"]), str(p["ranks"]), p["status"], f"{p['samples_per_s'] or 0:,.0f}",
                      f"{p['speedup'] or 0:.2f}", f"{p['efficiency'] or 0:.2f}")
    Console().print(table)
    print(f"summary: {path}")
    if any(p["simulated"] for p in points):
        print("note: simulated nodes share this machine's cores; efficiency says nothing about a real cluster")
    return 0 if all(p["status"] == "succeeded" for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
