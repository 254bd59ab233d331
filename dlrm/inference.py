"""Inference benchmark of a trained DLRM on CPU ranks: batch-size sweep, precision variants, roofline.

    [mpiexec -n R ...] python -m dlrm.inference --config RUN/config.json --data PROCESSED_DIR \\
        --checkpoint RUN_DIR/model.pt --out RUN_DIR

Timing. Before any clock starts, each rank reads rows of its contiguous shard of the
``val`` split into tensors once; every batch is then a slice of those tensors, so the
latencies are the forward pass alone (the model's call on two tensors it already holds,
to the logits), with no loader cost in them. A point (one
batch size) is inference.warmup_batches untimed batches, then timed batches (going
round the rows again when they run out) until inference.max_batches or inference.seconds_per_point is reached
(the batch that crosses the time budget still counts, so every point has at least
one). Batches are full, unless the shard is shorter than one: then its rows are one
short batch (samples/s counts the rows actually scored). The warm-up batches use the
rows after the timed ones, so the timed rows' embeddings are not cache-hot. The ranks run
side by side on one node and a barrier starts each point's timed loop on all of them
together, so the node's throughput is the sum of the ranks'; latency percentiles are
over all the ranks' batches. The fp32 model is timed at every size of
inference.sweep_batch_sizes and at inference.batch_size (always a sweep point).

Interaction. Run eagerly, the model computes its dot interaction with the compiled kernel
(dlrm.interaction_kernel, as training does) and, in fp32 on one thread, its MLPs' bias and
ReLU in one pass per layer (dlrm.mlp) when a C compiler is found; inference.json says whether
they ran ("interaction_kernel", "mlp_kernel"). At one thread per rank this eager model is the
fastest here (batch 2048, small profile: 133k samples/s per core against Inductor's 118k;
int8 207k against 161k), so the small profile runs two one-thread ranks eagerly.

Compilation. With inference.compile, when torch.compile works here (TorchInductor needs a
C++ compiler), every variant runs compiled instead (InductorDLRM): the same modules and
weights, the GEMMs still MKL's, everything between them fused into a few loops (ReLUs,
concatenations, lookup offsets, the interaction's dot products). Its loops use all of a
rank's threads, so it is the faster choice for one rank of several threads (2 threads,
batch 2048: 216k samples/s against the eager model's 207k). Compilation happens before any
clock starts: once for batch 1, once for every other batch size (the batch dimension is
symbolic). Otherwise, or with IPEX, the variants run eagerly; inference.json says which
and why ("compile").

Variants (inference.variants, fp32 always among them):
  fp32  the checkpoint as trained;
  bf16  the same model run under CPU autocast to bfloat16 (compiled: the MLPs in bf16,
        the interaction's dot products in fp32);
  int8  dynamic quantization of the MLPs' Linear layers to qint8 (weights quantized once,
        activations per batch); the embedding tables stay fp32.
Each variant is timed at inference.batch_size and scored on the whole val split at that
batch size (int8's activation scales depend on the batch), with exact AUC and log loss
gathered from every rank's shard as training's evaluation does, so a faster variant
cannot hide an accuracy loss.

Roofline. flops_per_sample is the forward pass's arithmetic (dlrm.roofline). Around every
fp32 sweep point each rank samples the fp32 GEMM rate on its own cores, all ranks side by
side (dlrm.roofline.GemmProbe, GEMM_SAMPLE_S before the warm-up and again after the timed
batches): the point's ceiling is the sum over the ranks of their mean, and its roofline
fraction the share of that ceiling its samples/s reaches. The host's clock moves from one
second to the next, so a ceiling measured at another moment of the run says less.

Rank 0 writes RUN_DIR/inference.json; a "point" is {batch_size, samples_per_s (summed over
ranks), latency_ms {p50, p99, mean}, batches and rows (over all ranks), ranks,
threads_per_rank, per_rank_samples_per_s}:
    the fp32 point at inference.batch_size, spread at the top level
    warmup_batches, seconds_per_point, ipex {used, reason}, compile {used, reason} and
                      interaction_kernel and mlp_kernel {used, reason} (all the fp32 sweep's)
    sweep             [point + gemm_gflops, roofline_fraction] by batch size
    best              {batch_size, samples_per_s} of the fastest sweep point
    variants          {name: {auc, logloss, accuracy, samples_per_s, latency_ms, batches, compiled}}
    val_rows, flops_per_sample
    gemm_gflops, roofline_fraction     the best point's
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from bench import config as bench_config
from bench.config import InferenceConfig, ModelConfig
from bench.fsutil import atomic_write_json
from dlrm import data, dist, interaction_kernel, mlp, roofline, runner, train
from dlrm.data import Range
from dlrm.interaction_kernel import InteractionKernel
from dlrm.mlp import MLPKernel
from dlrm.model import DLRM, _pairs
from preprocess.layout import ProcessedData

PROG = "dlrm.inference"
GEMM_SAMPLE_S = 0.1  # each GEMM sample around an fp32 sweep point, on every rank

Inputs = tuple[torch.Tensor, torch.Tensor]  # dense [n, 13], ids [n, 26]: the rows timed batches slice


def load_model(checkpoint: Path, kernel: InteractionKernel | None = None, mlp_kernel: MLPKernel | None = None
               ) -> DLRM:
    """The checkpoint's model in eval mode; ``kernel``, ``mlp_kernel``: its eager forward's compiled
    interaction and MLP passes."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = DLRM(saved["vocab_sizes"], ModelConfig.model_validate(saved["model_config"]), kernel=kernel,
                 mlp_kernel=mlp_kernel)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


class Autocast(nn.Module):
    """Runs the wrapped model under CPU bf16 autocast and returns float32 logits, as the fp32 model does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(dense, ids).float()


def quantize_int8(model: DLRM) -> nn.Module:
    """A copy of ``model`` whose Linear layers are dynamically quantized to qint8.

    The copy shares the embedding tables with ``model`` (they are not quantized, and
    copying them could double the memory of a large model).
    """
    shared = {id(weight): weight for weight in model.embedding_parameters()}
    copied = copy.deepcopy(model, memo=shared)
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; dynamic quantization still works as documented.
        warnings.filterwarnings("ignore", message=".*deprecated")
        return torch.ao.quantization.quantize_dynamic(copied, {nn.Linear}, dtype=torch.qint8, inplace=True)


class InductorDLRM(nn.Module):
    """``model``'s forward written for TorchInductor: the same modules, weights and arithmetic.

    The interaction's pairs are computed as sum_d T[:, i, d] * T[:, j, d] over the pairs
    (i, j) DLRM.forward outputs, in its order, instead of T Tᵀ by a batched matmul and a
    gather of the lower triangle: Inductor fuses the concatenation, the products, the
    sums and the output's concatenation into one loop over the batch. Eagerly that
    expression would materialise a [B, pairs, d] tensor: it is only run compiled.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        features = len(model.vocab_sizes) + 1
        pairs = _pairs(tuple(model.embeddings.tables))  # flat positions in T Tᵀ, as DLRM's interaction reads them
        self.register_buffer("left", pairs // features, persistent=False)
        self.register_buffer("right", pairs % features, persistent=False)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.bottom(dense)
        t = torch.cat([x.unsqueeze(1), self.model.embeddings(ids)], dim=1)
        pairs = (t[:, self.left] * t[:, self.right]).sum(dim=2)
        zeros = pairs.new_zeros(pairs.shape[0], self.model.top[0].in_features - x.shape[1] - pairs.shape[1])
        return self.model.top(torch.cat([x, pairs, zeros], dim=1)).squeeze(1)


class Compiled(nn.Module):
    """``module`` compiled by TorchInductor."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.compiled = torch.compile(module)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # A symbolic batch dimension from the first call: one graph for every batch size but 1
        # (which torch specialises), instead of one per size and a dynamic one after the second.
        torch._dynamo.maybe_mark_dynamic(dense, 0)
        torch._dynamo.maybe_mark_dynamic(ids, 0)
        return self.compiled(dense, ids)


def ipex_optimize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import intel_extension_for_pytorch as ipex  # only called when dist.ipex_status() said it works

    return ipex.optimize(model, dtype=dtype)


def build_variant(model: DLRM, name: str, use_ipex: bool, inductor: bool = False) -> nn.Module:
    """``model`` as it runs in variant ``name`` (see the module docstring), compiled by Inductor or eager;
    ``model`` is left unchanged. IPEX brings its own kernels: not combined with ``inductor``."""
    if name not in ("fp32", "bf16", "int8"):
        raise ValueError(f"unknown inference variant {name!r}")
    if name == "int8":
        module = quantize_int8(model)
    elif use_ipex:
        module = ipex_optimize(model, torch.bfloat16 if name == "bf16" else torch.float32)
    else:
        module = model
    if inductor:
        module = InductorDLRM(module)
    if name == "bf16":
        # IPEX's bf16 path converts the weights and expects autocast around the call, like plain torch.
        module = Autocast(module)
    # In eval mode throughout, so train.evaluate's eval()/train(was_training) changes nothing
    # (a compiled graph is specialised on the modules' training flags).
    return (Compiled(module) if inductor else module).eval()


@torch.inference_mode()
def compile_first(variant: nn.Module, inputs: Inputs) -> tuple[bool, str]:
    """Compile a Compiled ``variant`` before any clock starts (batch 1, then a symbolic batch),
    and whether that worked, and why not (e.g. no C++ compiler for Inductor's kernels)."""
    dense, ids = inputs
    try:
        for rows in (1, 2):
            variant(dense[:rows], ids[:rows])
    except Exception as err:  # any failure to compile means: run eagerly, and say why
        return False, f"torch.compile failed: {type(err).__name__}: {err}".splitlines()[0]
    return True, f"TorchInductor, torch {torch.__version__}"


def prepare(rank: runner.Rank, model: DLRM, name: str, inputs: Inputs, use_ipex: bool,
            inductor: bool) -> tuple[nn.Module, dict]:
    """Variant ``name`` ready to time: compiled when ``inductor`` asks and it works (not with
    IPEX), else eager; and {used, reason} saying which."""
    if use_ipex:
        return build_variant(model, name, use_ipex), {"used": False, "reason": "IPEX is used instead"}
    if not inductor:
        return build_variant(model, name, use_ipex), {"used": False, "reason": "inference.compile is false"}
    variant = build_variant(model, name, use_ipex, inductor=True)
    start = time.perf_counter()
    used, reason = compile_first(variant, inputs)
    if not used:
        variant = build_variant(model, name, use_ipex)
    runner.log(rank, f"{PROG}:   compiled in {time.perf_counter() - start:.1f}s" if used
               else f"{PROG}:   eager: {reason}")
    return variant, {"used": used, "reason": reason}


def pool_rows(inf: InferenceConfig, shard_rows: int, sizes: list[int]) -> int:
    """Rows to read for timing: enough for every point's timed and warm-up batches, within the shard."""
    return min(shard_rows, max(sizes) * (inf.max_batches + inf.warmup_batches))


@torch.inference_mode()
def timing_inputs(split: ProcessedData, shard: Range, rows: int) -> Inputs:
    """The first ``rows`` rows of this rank's shard, read into tensors once.

    Inference tensors, as train.evaluate's batches are: a compiled variant is specialised
    on that, and would otherwise compile again for the scoring.
    """
    start, stop = shard
    dense, ids, _ = data.read_batch(split, (start, min(stop, start + rows)))
    return dense, ids


def plan(shard: Range, batch_size: int, warmup: int, max_batches: int) -> tuple[list[Range], list[Range]]:
    """(warm-up batches, timed batches) of one shard.

    Timed batches are full ones (a short batch would skew the latency), unless the
    shard is smaller than one batch; there are always ``max_batches`` of them, going
    round the shard again when it is short, so that a point spans enough time to be
    measured. Warm-up batches follow the shard's first timed ones: any rows will do.
    """
    ranges = data.batch_ranges(shard, batch_size)
    full = [r for r in ranges if r[1] - r[0] == batch_size] or ranges[:1]
    if not full:
        raise ValueError(f"this rank's shard of the val split is empty ({shard})")
    timed = [full[i % len(full)] for i in range(max_batches)]
    warm = [full[(max_batches + i) % len(full)] for i in range(warmup)]
    return warm, timed


@torch.inference_mode()
def time_point(model: nn.Module, inputs: Inputs, batch_size: int, inf: InferenceConfig,
               probe: roofline.GemmProbe | None = None) -> dict:
    """This rank's per-batch forward latencies (seconds) at one batch size, and the rows they scored;
    with a ``probe``, also its GEMM rate sampled before and after (``gemm_readings``, GFLOP/s)."""
    dense, ids = inputs
    warm, timed = plan((0, len(dense)), batch_size, inf.warmup_batches, inf.max_batches)
    readings = []
    if probe is not None:
        torch_dist.barrier()  # the ranks sample side by side, as they run the point
        readings.append(probe.sample(GEMM_SAMPLE_S))
    for start, stop in warm:
        model(dense[start:stop], ids[start:stop])
    torch_dist.barrier()  # the ranks' timed loops run side by side
    latencies, rows = [], 0
    deadline = time.perf_counter() + inf.seconds_per_point
    for start, stop in timed:
        batch = dense[start:stop], ids[start:stop]  # views: slicing stays outside the clock anyway
        begin = time.perf_counter()
        model(*batch)
        end = time.perf_counter()
        latencies.append(end - begin)
        rows += stop - start
        if end >= deadline:
            break
    if probe is not None:
        readings.append(probe.sample(GEMM_SAMPLE_S))
    return {"latencies": latencies, "rows": rows, "gemm_readings": readings}


def summarise(per_rank: list[dict], batch_size: int, threads: int) -> dict:
    """One point from every rank's latencies: the ranks ran side by side, so their rates add up (and so
    do their GEMM rates: the point's gemm_gflops, when sampled)."""
    latencies_ms = np.concatenate([np.asarray(r["latencies"]) for r in per_rank]) * 1000.0
    rates = [r["rows"] / sum(r["latencies"]) for r in per_rank]
    point = {
        "batch_size": batch_size,
        "samples_per_s": float(sum(rates)),
        "latency_ms": {
            "p50": float(np.percentile(latencies_ms, 50)),
            "p99": float(np.percentile(latencies_ms, 99)),
            "mean": float(latencies_ms.mean()),
        },
        "batches": len(latencies_ms),
        "rows": int(sum(r["rows"] for r in per_rank)),
        "ranks": len(per_rank),
        "threads_per_rank": threads,
        "per_rank_samples_per_s": [float(rate) for rate in rates],
    }
    gemm = roofline.in_run_gemm([r["gemm_readings"] for r in per_rank], GEMM_SAMPLE_S, "fp32")
    if gemm is not None:
        point["gemm_gflops"] = gemm["machine_gflops"]
    return point


def measure(rank: runner.Rank, model: nn.Module, inputs: Inputs, batch_size: int, inf: InferenceConfig,
            probe: roofline.GemmProbe | None = None) -> dict:
    """One point, timed on every rank and summarised over all of them (on every rank)."""
    per_rank = dist.all_gather(time_point(model, inputs, batch_size, inf, probe))
    point = summarise(per_rank, batch_size, rank.pinning["threads"])
    latency = point["latency_ms"]
    runner.log(rank, f"{PROG}:   batch {batch_size}: {point['samples_per_s']:.0f} samples/s, latency p50 "
                     f"{latency['p50']:.3f} ms, p99 {latency['p99']:.3f} ms over {point['batches']} batches")
    return point


def benchmark(rank: runner.Rank, model: DLRM, val: ProcessedData, inputs: Inputs, sizes: list[int],
              inf: InferenceConfig, use_ipex: bool) -> tuple[list[dict], dict[str, dict]]:
    """The fp32 sweep over ``sizes`` (with the GEMM rate sampled around each point), and every variant's
    val scores next to its speed at inf.batch_size (the variants on rank 0 only: the scores are
    gathered there)."""
    sweep: list[dict] = []
    variants: dict[str, dict] = {}
    probe = roofline.GemmProbe(torch.float32)
    for name in inf.variants:  # fp32 is always among them (see InferenceConfig)
        runner.log(rank, f"{PROG}: {name}")
        variant, compiled = prepare(rank, model, name, inputs, use_ipex, inf.compile)
        if name == "fp32":
            sweep = [measure(rank, variant, inputs, size, inf, probe) for size in sizes]
            point = sweep[sizes.index(inf.batch_size)]
        else:
            point = measure(rank, variant, inputs, inf.batch_size, inf)
        scores = train.evaluate(rank, variant, val, inf.batch_size)
        if rank.is_main:
            runner.log(rank, f"{PROG}:   val AUC {scores['auc']}, logloss {scores['logloss']:.5f}")
            variants[name] = {"auc": scores["auc"], "logloss": scores["logloss"], "accuracy": scores["accuracy"],
                              "samples_per_s": point["samples_per_s"], "latency_ms": point["latency_ms"],
                              "batches": point["batches"], "compiled": compiled}
    return sweep, variants


def report(sweep: list[dict], variants: dict[str, dict], cfg: bench_config.Config, val_rows: int,
           ipex: tuple[bool, str], kernels: dict[str, tuple[bool, str]]) -> dict:
    """inference.json (see the module docstring); ``kernels``: whether each compiled kernel
    (interaction_kernel, mlp_kernel) loaded, and why (not)."""
    inf = cfg.inference
    best = max(sweep, key=lambda p: p["samples_per_s"])
    flops = roofline.flops_per_sample(cfg.model, training=False)
    if variants["fp32"]["compiled"]["used"]:
        kernels = {name: (False, "the variants ran compiled: TorchInductor fuses the model's loops")
                   for name in kernels}
    result = {
        **next(p for p in sweep if p["batch_size"] == inf.batch_size),
        "warmup_batches": inf.warmup_batches,
        "seconds_per_point": inf.seconds_per_point,
        "ipex": {"used": ipex[0], "reason": ipex[1]},
        "compile": variants["fp32"]["compiled"],
        **{name: {"used": used, "reason": reason} for name, (used, reason) in kernels.items()},
        "sweep": sweep,
        "best": {"batch_size": best["batch_size"], "samples_per_s": best["samples_per_s"]},
        "variants": variants,
        "val_rows": val_rows,
        "flops_per_sample": flops,
    }
    for point in sweep:
        point["roofline_fraction"] = roofline.roofline_fraction(point["samples_per_s"], flops, point["gemm_gflops"])
    result["gemm_gflops"] = best["gemm_gflops"]
    result["roofline_fraction"] = best["roofline_fraction"]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = runner.entry_parser(PROG, __doc__, out_help="run folder for inference.json")
    parser.add_argument("--checkpoint", type=Path, required=True, help="model.pt written by dlrm.train")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = bench_config.load(args.config)
    inf = cfg.inference
    # Gloo only gathers the results here; no gradients, so no need for a faster backend.
    rank = runner.start(cfg, "gloo", expected_ranks=inf.ranks, prog=PROG)
    info = rank.info
    ipex = dist.ipex_status()

    kernel, kernel_status = interaction_kernel.load()
    mlp_kernel, mlp_status = mlp.load()
    model = load_model(args.checkpoint, kernel, mlp_kernel)
    val = ProcessedData(args.data, "val")
    sizes = sorted({*inf.sweep_batch_sizes, inf.batch_size})
    shard = data.shard_range(len(val), info.rank, info.world_size)
    inputs = timing_inputs(val, shard, pool_rows(inf, shard[1] - shard[0], sizes))
    runner.log(rank, f"{PROG}: {info.world_size} ranks, {rank.pinning['threads']} threads/rank, ipex: {ipex[1]}; "
                     f"batch sizes {sizes}, variants {inf.variants} at batch {inf.batch_size}")
    sweep, variants = benchmark(rank, model, val, inputs, sizes, inf, ipex[0])
    if rank.is_main:
        result = report(sweep, variants, cfg, len(val), ipex, {"interaction_kernel": (kernel is not None, kernel_status),
                                                               "mlp_kernel": (mlp_kernel is not None, mlp_status)})
        runner.log(rank, f"{PROG}: {result['samples_per_s']:.0f} samples/s at batch {inf.batch_size}; best "
                         f"{result['best']['samples_per_s']:.0f} samples/s at batch {result['best']['batch_size']}")
        atomic_write_json(args.out / "inference.json", result)
    torch_dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(runner.run(main, PROG))
