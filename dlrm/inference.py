"""Inference throughput and latency of a trained DLRM on CPU ranks.

    [mpiexec -n R ...] python -m dlrm.inference --config RUN/config.json --data PROCESSED_DIR \\
        --checkpoint RUN_DIR/model.pt --out RUN_DIR

Each rank loads the checkpoint and scores its contiguous shard of the ``val`` split
in batches of inference.batch_size: inference.warmup_batches untimed, then up to
inference.max_batches timed. Only the forward pass is timed (the batch is already in
tensors), so the numbers are the model's, not the loader's. The ranks run side by
side on one node, so the node's throughput is the sum of theirs. Rank 0 writes
RUN_DIR/inference.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from bench import config as bench_config
from bench.config import ModelConfig
from bench.fsutil import atomic_write_json
from dlrm import data, dist, runner
from dlrm.data import Range
from dlrm.model import DLRM
from preprocess.layout import ProcessedData

PROG = "dlrm.inference"


def load_model(checkpoint: Path) -> DLRM:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = DLRM(saved["vocab_sizes"], ModelConfig.model_validate(saved["model_config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def maybe_ipex(model: DLRM) -> tuple[torch.nn.Module, tuple[bool, str]]:
    status = dist.ipex_status()
    if not status[0]:
        return model, status
    import intel_extension_for_pytorch as ipex  # only reached when the import is known to work

    return ipex.optimize(model, dtype=torch.float32), status


def plan(shard: Range, batch_size: int, warmup: int, max_batches: int) -> tuple[list[Range], list[Range]]:
    """(warm-up batches, timed batches) of one shard.

    Timed batches are full ones (a short batch would skew the latency), unless the
    shard is smaller than one batch. Warm-up batches follow the timed ones, wrapping
    around when the shard is short: any rows will do, they are never timed.
    """
    ranges = data.batch_ranges(shard, batch_size)
    full = [r for r in ranges if r[1] - r[0] == batch_size] or ranges[:1]
    if not full:
        raise ValueError(f"this rank's shard of the val split is empty ({shard})")
    timed = full[:max_batches]
    warm = [full[(len(timed) + i) % len(full)] for i in range(warmup)]
    return warm, timed


@torch.inference_mode()
def measure(model: torch.nn.Module, split: ProcessedData, warm: list[Range], timed: list[Range]) -> dict:
    """Per-batch forward latencies (seconds) and rows scored on this rank."""
    for rows in warm:
        dense, ids, _ = data.read_batch(split, rows)
        model(dense, ids)
    torch_dist.barrier()  # the ranks' timed loops run side by side
    latencies = []
    for rows in timed:
        dense, ids, _ = data.read_batch(split, rows)
        start = time.perf_counter()
        model(dense, ids)
        latencies.append(time.perf_counter() - start)
    return {"latencies": latencies, "rows": sum(stop - start for start, stop in timed)}


def summarise(per_rank: list[dict], batch_size: int, threads: int) -> dict:
    latencies_ms = np.concatenate([np.asarray(r["latencies"]) for r in per_rank]) * 1000.0
    rates = [r["rows"] / sum(r["latencies"]) for r in per_rank]
    return {
        "samples_per_s": float(sum(rates)),
        "latency_ms": {
            "p50": float(np.percentile(latencies_ms, 50)),
            "p99": float(np.percentile(latencies_ms, 99)),
            "mean": float(latencies_ms.mean()),
        },
        "batch_size": batch_size,
        "batches": len(latencies_ms),
        "rows": int(sum(r["rows"] for r in per_rank)),
        "ranks": len(per_rank),
        "threads_per_rank": threads,
        "per_rank_samples_per_s": [float(rate) for rate in rates],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="resolved run configuration (config.json)")
    parser.add_argument("--data", type=Path, required=True, help="processed data folder (has manifest.json)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="model.pt written by dlrm.train")
    parser.add_argument("--out", type=Path, required=True, help="run folder for inference.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = bench_config.load(args.config)
    inf = cfg.inference
    # Gloo only gathers the results here; no gradients, so no need for a faster backend.
    rank = runner.start(cfg, "gloo", expected_ranks=inf.ranks, prog=PROG)
    info = rank.info

    model, ipex = maybe_ipex(load_model(args.checkpoint))
    val = ProcessedData(args.data, "val")
    warm, timed = plan(data.shard_range(len(val), info.rank, info.world_size),
                       inf.batch_size, inf.warmup_batches, inf.max_batches)
    runner.log(rank, f"{PROG}: {info.world_size} ranks, {rank.pinning['threads']} threads/rank, ipex: {ipex[1]}; "
                     f"{len(warm)} warm-up + {len(timed)} timed batches of {inf.batch_size} per rank")
    mine = measure(model, val, warm, timed)
    per_rank = dist.all_gather(mine)
    if rank.is_main:
        result = {**summarise(per_rank, inf.batch_size, rank.pinning["threads"]),
                  "warmup_batches": len(warm), "ipex": {"used": ipex[0], "reason": ipex[1]}}
        runner.log(rank, f"{PROG}: {result['samples_per_s']:.0f} samples/s, latency p50 "
                         f"{result['latency_ms']['p50']:.2f} ms, p99 {result['latency_ms']['p99']:.2f} ms")
        atomic_write_json(args.out / "inference.json", result)
    torch_dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(runner.run(main, PROG))
