"""The compute roofline: what this machine can do, what the model asks, how close a run gets.

    python -m dlrm.roofline --threads 1 --ranks 2

measures dense GEMM GFLOP/s (fp32 and bf16) with the threads one rank gets and a
STREAM-like memory bandwidth, and prints them as JSON. ``flops_per_sample`` counts
the DLRM's arithmetic per sample, and ``roofline_fraction`` turns a measured
samples/s into the share of the GEMM ceiling it reaches.

Every measurement is the best of a few timed windows, not the mean: a roofline is
a ceiling, and on a shared machine interference only ever makes a window slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from bench.config import NUM_DENSE, NUM_SPARSE, ModelConfig
from dlrm.model import interaction_size

PROG = "dlrm.roofline"

# Timed windows per measurement; the best one is reported.
REPEATS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROBE_N = 1024  # the reference product's size: n x n by n x n


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with exactly ``threads`` intra-op threads, then restore the previous count."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def window_rate(op: Callable[[], object], work_per_call: float, seconds: float) -> float:
    """Work/second of ``op`` called over and over for about ``seconds`` (at least once)."""
    calls = 0
    start = time.perf_counter()
    while True:
        op()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * work_per_call / elapsed


def best_rate(op: Callable[[], object], work_per_call: float, seconds: float) -> float:
    """Best work/second of ``op`` over REPEATS windows that together last about ``seconds``.

    One untimed call first: it faults in the buffers and lets the library pick its kernel.
    Each window runs at least one call, so a tiny ``seconds`` still measures something.
    """
    op()
    return max(window_rate(op, work_per_call, seconds / REPEATS) for _ in range(REPEATS))


class GemmProbe:
    """``torch.mm`` of n x n ``dtype`` matrices, the roofline's reference product: an n x n x n product
    is n^3 multiply-adds, 2 n^3 flops. Its matrices are made once, so a run can sample the rate
    between pieces of its own work (``sample``) with nothing allocated."""

    def __init__(self, dtype: torch.dtype, n: int = PROBE_N):
        self.a = torch.randn(n, n).to(dtype)
        self.b = torch.randn(n, n).to(dtype)
        self.c = torch.empty(n, n, dtype=dtype)  # a preallocated output keeps the allocator out of the timing
        self.flops = 2.0 * n**3
        self.readings: list[float] = []

    def __call__(self) -> None:
        torch.mm(self.a, self.b, out=self.c)

    def sample(self, seconds: float) -> float:
        """GFLOP/s over one window of about ``seconds`` with this process's threads, after one untimed
        call (the run's own work has just evicted the matrices from the caches); kept in ``readings``."""
        self()
        gflops = window_rate(self, self.flops, seconds) / 1e9
        self.readings.append(gflops)
        return gflops


def measure_gemm(threads: int, dtype: torch.dtype, seconds: float = 1.0, n: int = PROBE_N) -> float:
    """Dense GEMM GFLOP/s of ``GemmProbe``'s product with ``threads`` threads: the best of REPEATS windows.

    bf16 is measured whether or not the CPU has native bf16 (see ``bf16_native``): without
    it the number is simply low.
    """
    probe = GemmProbe(dtype, n)
    with torch_threads(threads):
        return best_rate(probe, probe.flops, seconds) / 1e9


def bf16_native() -> bool:
    """Whether bf16 matmuls run on bf16 hardware (AVX512-BF16 or AMX through oneDNN)
    rather than being emulated through fp32 conversion."""
    return torch.backends.mkldnn.is_available() and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )


def measure_memory_bandwidth(threads: int, seconds: float = 0.5, nbytes: int = 256 << 20) -> float:
    """GB/s of a STREAM triad ``c = a + s*b`` on float32 tensors of ``nbytes`` each.

    Counted as STREAM does: 3 * nbytes per triad (read a and b, write c), not counting
    the write-allocate read of c, so the figure is comparable with published STREAM
    numbers. ``nbytes`` must be far larger than the last-level cache to measure DRAM.
    """
    elements = nbytes // 4
    a = torch.ones(elements)
    b = torch.ones(elements)
    c = torch.empty(elements)
    with torch_threads(threads):
        return best_rate(lambda: torch.add(a, b, alpha=3.0, out=c), 3.0 * elements * 4, seconds) / 1e9


def mlp_flops(in_features: int, sizes: list[int]) -> int:
    """Forward flops per sample of a stack of Linear layers: 2 per multiply-add.

    Bias adds and ReLUs (one op per output, against in_features per output for the
    matmul) are left out, as GEMM-roofline counts usually do.
    """
    flops = 0
    for out_features in sizes:
        flops += 2 * in_features * out_features
        in_features = out_features
    return flops


def flops_per_sample(cfg: ModelConfig, training: bool) -> float:
    """Arithmetic per sample of the DLRM in ``dlrm.model``.

    Forward: the bottom MLP (13 -> cfg.bottom_mlp), the top MLP
    (d + 27*26/2 -> cfg.top_mlp), and the interaction's batched matmul T Tᵀ of a
    [27, d] by [d, 27] product, 2 * 27 * 27 * d. The embedding lookups are 0 flops:
    they only move rows (memory-bound, outside a compute roofline). The zero columns
    padding the top MLP's input (dlrm.model.top_input_size) are not counted either:
    the run does that arithmetic, but it is not the model's.

    Training counts 3x forward: each matmul's forward plus the two backward GEMMs of
    the same size (gradient with respect to the input and to the weight). That
    slightly overcounts, since the first bottom layer needs no input gradient, by
    2 * 13 * bottom_mlp[0] flops per sample; the convention keeps the number
    comparable with other DLRM roofline figures.
    """
    dim = cfg.embedding_dim
    features = NUM_SPARSE + 1
    forward = (
        mlp_flops(NUM_DENSE, cfg.bottom_mlp)
        + mlp_flops(interaction_size(NUM_SPARSE, dim), cfg.top_mlp)
        + 2 * features * features * dim
    )
    return float(3 * forward if training else forward)


def roofline_fraction(samples_per_s: float, flops_per_sample: float, gflops: float) -> float:
    """Achieved samples/s as a share of the samples/s a ``gflops`` machine could do at most."""
    return samples_per_s / (gflops * 1e9 / flops_per_sample)


def measure_machine(threads_per_rank: int, ranks: int, gemm_seconds: float = 1.0,
                    memory_seconds: float = 0.5) -> dict:
    """Roofline numbers for ``ranks`` ranks of ``threads_per_rank`` threads each.

    GEMM is measured in this one process with the threads one rank gets, the way a
    rank runs alone; the machine total is that times ``ranks``. GEMM is compute-bound,
    so the other ranks' cores idling changes little, but this is a ceiling: ranks side
    by side share the last-level cache and the power budget (clock boost), so the true
    concurrent figure can be somewhat lower, and much lower if the "cores" are SMT
    siblings. Memory bandwidth is a shared resource, so it is measured once for the
    whole machine, with all ``threads_per_rank * ranks`` threads.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    per_rank = {name: measure_gemm(threads_per_rank, dtype, gemm_seconds) for name, dtype in DTYPES.items()}
    return {
        "gemm_gflops": per_rank,
        "machine_gemm_gflops": {dtype: gflops * ranks for dtype, gflops in per_rank.items()},
        "bf16_native": bf16_native(),
        "memory_gb_per_s": measure_memory_bandwidth(threads_per_rank * ranks, memory_seconds),
        "threads_per_rank": threads_per_rank,
        "ranks": ranks,
    }


def add_gemm_readings(measured: dict, again: dict[str, float]) -> dict:
    """``measure_machine``'s figures with the GEMM rates ``again`` measured later in the run: every reading
    is kept (gemm_gflops_readings) and the figures become each precision's best, since a roofline is a
    ceiling and interference only ever slows a reading down. One probe that caught a busy second reads
    low and flatters every fraction computed against it (two runs a minute apart on the development
    machine: 166 and 183 GFLOP/s, the same training throughput)."""
    readings = measured.setdefault("gemm_gflops_readings", {k: [v] for k, v in measured["gemm_gflops"].items()})
    for dtype, gflops in again.items():
        readings[dtype].append(gflops)
        measured["gemm_gflops"][dtype] = max(readings[dtype])
        measured["machine_gemm_gflops"][dtype] = measured["gemm_gflops"][dtype] * measured["ranks"]
    return measured


def in_run_gemm(per_rank: list[list[float]], seconds_per_sample: float, precision: str) -> dict | None:
    """The GEMM rate the ranks had during a run, from the samples each took side by side with the
    others (``GemmProbe.sample``, each rank on its own cores): the machine's figure is the sum of the
    ranks' means, a mean of equal windows being the rate averaged over the time sampled. None
    without samples."""
    if not all(per_rank):
        return None
    means = [statistics.fmean(readings) for readings in per_rank]
    return {
        "precision": precision,
        "machine_gflops": sum(means),
        "per_rank_mean_gflops": means,
        "min_gflops": min(min(readings) for readings in per_rank),
        "max_gflops": max(max(readings) for readings in per_rank),
        "samples": min(len(readings) for readings in per_rank),
        "seconds_per_sample": seconds_per_sample,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True, help="torch threads per rank")
    parser.add_argument("--ranks", type=int, required=True, help="ranks side by side on this machine")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing budget per GEMM measurement")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(json.dumps(measure_machine(args.threads, args.ranks, gemm_seconds=args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
