"""What every rank entry point shares: start-up, console output, failure handling, atomic saves.

Console contract (read by the harness from rank 0's stdout):
    PROGRESS {"stage": ..., "step": ..., "steps": ..., ...}   one JSON object per line
        dlrm.train: stage "train" (samples_per_s, loss) and "eval" (samples, rows, auc,
        loss: the test log loss, samples_per_s: rows evaluated per second)
    anything else                                             a human log line
A failing rank prints one line to stderr and exits non-zero (mpiexec then ends the job).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.config import Config
from bench.fsutil import atomic_open
from dlrm import dist


@dataclass(frozen=True)
class Rank:
    info: dist.RankInfo
    backend: str
    pinning: dict  # what pin_threads did on this rank (with the ccl backend: and oneCCL's settings)

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0


def node_cores(cfg: Config) -> list[int]:
    """The cores the ranks of this node share: this process's affinity, capped at cluster.cpus_per_node."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    if cfg.cluster.cpus_per_node is not None:
        cores = cores[:cfg.cluster.cpus_per_node]
    return cores


def _omp_threads() -> int | None:
    """The launcher's per-rank thread budget, if it set one."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def start(cfg: Config, backend: str, expected_ranks: int, prog: str) -> Rank:
    """Find our rank, pin our threads, join the process group."""
    info = dist.launcher_env()
    pinning = dist.pin_threads(info, node_cores(cfg), max_threads=_omp_threads(), ccl_worker=backend == "ccl")
    if backend == "ccl":
        pinning["ccl_environment"] = dist.ccl_environment(pinning)
        os.environ.update(pinning["ccl_environment"])
    # Every rank says where it runs: the launcher maps a dead process id back to its rank.
    print(f"{prog}: rank {info.rank} of {info.world_size}: pid {os.getpid()}, cores {pinning['cores']}", flush=True)
    dist.init(info, backend)
    rank = Rank(info, backend, pinning)
    if info.world_size != expected_ranks:
        log(rank, f"{prog}: note: launched with {info.world_size} ranks, the configuration expects "
                  f"{expected_ranks}; using {info.world_size}")
    return rank


def log(rank: Rank, message: str) -> None:
    if rank.is_main:
        print(message, flush=True)


def progress(rank: Rank, **fields: object) -> None:
    if rank.is_main:
        print("PROGRESS " + json.dumps(fields), flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def entry_parser(prog: str, doc: str, out_help: str) -> argparse.ArgumentParser:
    """The arguments every rank entry point takes; each adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="resolved run configuration (config.json)")
    parser.add_argument("--data", type=Path, required=True, help="processed data folder (has manifest.json)")
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    return parser


def run(main: Callable[[list[str] | None], int], prog: str, argv: list[str] | None = None) -> int:
    """Run an entry point; any exception becomes one stderr line and exit status 1."""
    try:
        return main(argv)
    except Exception as err:  # noqa: BLE001 - the contract is "one line, non-zero"
        rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: rank {rank}: error: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
        return 1
    finally:
        # Objects in reference cycles (autograd graphs) may hold the process group: free them now,
        # while the group is alive, not during interpreter shutdown (where it may abort).
        gc.collect()
        dist.finish()


def save_atomically(obj: object, path: Path) -> None:
    """torch.save to a temporary name in the same folder, then rename: never a half-written file."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
