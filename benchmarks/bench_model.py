"""Model micro-benchmarks at the small profile's sizes, one rank's batch on one thread.

Embedding lookup and sparse update on the model's tables, the dot interaction, the MLPs' training
step and the whole DLRM training step (without the collectives of a multi-rank run). Everything runs
on one thread, as one rank of the small profile does (2 ranks x 1 thread on 2 cores), and is set
against the machine measured on one thread in the same session (``reference``): embedding traffic
against the memory bandwidth, dense math against the GEMM rate (the roofline fraction of
dlrm.roofline). These ratios move less with the machine and its load than the raw rates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

from bench.config import NUM_DENSE, NUM_SPARSE, Config
from dlrm import data, optim, roofline
from dlrm.model import DLRM, dot_interaction, interaction_size, mlp, top_input_size
from preprocess import synthetic
from throughput import rates, record

BATCH = 1024  # per rank: the small profile's global batch of 2048 over its 2 ranks
THREADS = 1  # per rank in the small profile


@pytest.fixture(scope="module")
def reference() -> dict[str, float]:
    """This machine on THREADS threads, measured now: fp32 GEMM GFLOP/s and memory GB/s (triad)."""
    return {"gemm_fp32_gflops": roofline.measure_gemm(THREADS, torch.float32, seconds=1.0),
            "memory_gb_per_s": roofline.measure_memory_bandwidth(THREADS, seconds=0.5)}


@pytest.fixture(autouse=True)
def one_rank_of_threads() -> Iterator[None]:
    with roofline.torch_threads(THREADS):
        yield


@pytest.fixture(scope="module")
def vocab_sizes(small: Config) -> list[int]:
    """The small profile's tables: its synthetic cardinalities plus the out-of-vocabulary id 0."""
    return [n + 1 for n in synthetic.cardinalities(small.data.synthetic.max_cardinality)]


@pytest.fixture(scope="module")
def batch(small: Config, vocab_sizes: list[int]) -> data.Batch:
    """One rank's batch shaped like the loader's: heavy-tailed ids (Zipf, as the data), dense in log space."""
    rng = np.random.default_rng(0)
    # [26, B] then transposed, as data.read_batch lays the ids out (each table's ids contiguous).
    ids = np.stack([(rng.zipf(small.data.synthetic.zipf_exponent, BATCH) - 1) % n for n in vocab_sizes])
    dense = rng.exponential(2.0, (BATCH, NUM_DENSE)).astype(np.float32)
    labels = (rng.random(BATCH) < small.data.synthetic.click_rate).astype(np.float32)
    return data.Batch(torch.from_numpy(dense), torch.from_numpy(ids).T, torch.from_numpy(labels))


@pytest.fixture(scope="module")
def model(small: Config, vocab_sizes: list[int]) -> DLRM:
    """The DLRM with all its tables in this process (one rank's view without sharding)."""
    torch.manual_seed(small.train.seed)
    return DLRM(vocab_sizes, small.model)


@pytest.fixture(scope="module")
def optimizers(small: Config, model: DLRM) -> dict[str, torch.optim.Optimizer]:
    """The optimizers dlrm.train steps: the tables' rule on the sparse rows (compiled when a C compiler
    is found), fused Adam on the MLPs."""
    kernel, _ = optim.load_kernel()
    return {"sparse": optim.SparseOptimizer(model.embedding_parameters(), lr=small.train.sparse_lr,
                                            rule=small.train.sparse_optimizer, kernel=kernel),
            "dense": torch.optim.Adam(model.dense_parameters(), lr=small.train.dense_lr, fused=True)}


def test_embedding_lookup(benchmark, model, batch, reference):
    """The 26 tables' vectors for one batch, [B, 26, d]."""
    with torch.no_grad():
        embedded = benchmark(model.embeddings, batch.ids)
    got = rates(benchmark, {"samples": BATCH, "gathered_bytes": embedded.numel() * embedded.element_size()})
    bandwidth = reference["memory_gb_per_s"] * 1e9
    record(benchmark, {**got, "memory_bandwidth_fraction": got["gathered_bytes_per_s"] / bandwidth})


def test_embedding_sparse_update(benchmark, model, optimizers, batch):
    """Lookup, backward to the sparse gradient of the touched rows, and the sparse optimizer's step."""
    with torch.no_grad():
        upstream = torch.randn_like(model.embeddings(batch.ids))  # a fixed gradient from the interaction

    def update() -> None:
        optimizers["sparse"].zero_grad()
        model.embeddings(batch.ids).backward(upstream)
        optimizers["sparse"].step()

    update()  # the optimizer's first step creates its state
    benchmark(update)
    row_bytes = upstream.numel() * upstream.element_size()  # one row per table and sample
    record(benchmark, rates(benchmark, {"samples": BATCH, "updated_row_bytes": row_bytes}))


@pytest.mark.parametrize("passes", ["forward", "forward_backward"])
def test_dot_interaction(benchmark, small, reference, passes):
    dim = small.model.embedding_dim
    grad = passes == "forward_backward"
    bottom = torch.randn(BATCH, dim, requires_grad=grad)
    embedded = torch.randn(BATCH, NUM_SPARSE, dim, requires_grad=grad)
    upstream = torch.randn(BATCH, interaction_size(NUM_SPARSE, dim))

    def interact() -> None:
        out = dot_interaction(bottom, embedded)
        if grad:
            out.backward(upstream)

    benchmark(interact)
    features = NUM_SPARSE + 1
    flops = 2 * features * features * dim * BATCH * (3 if grad else 1)  # the bmm, as dlrm.roofline counts it
    got = rates(benchmark, {"samples": BATCH, "flops": flops})
    record(benchmark, {**got, "gemm_fraction": got["flops_per_s"] / (reference["gemm_fp32_gflops"] * 1e9)})


def _step(optimizers: Iterable[torch.optim.Optimizer], loss: torch.Tensor) -> None:
    for opt in optimizers:
        opt.zero_grad()
    loss.backward()
    for opt in optimizers:
        opt.step()


def test_mlp_training_step(benchmark, small, batch, reference):
    """Bottom and top MLP (small profile sizes): forward, backward and Adam, as in training; the
    top MLP's input beyond the bottom output stands in for the interaction's features (and padding)."""
    cfg = small.model
    torch.manual_seed(0)
    mlps = nn.ModuleList([mlp(NUM_DENSE, cfg.bottom_mlp, relu_last=True),
                          mlp(top_input_size(NUM_SPARSE, cfg.embedding_dim), cfg.top_mlp, relu_last=False)])
    bottom, top = mlps
    optimizers = [torch.optim.Adam(mlps.parameters(), lr=small.train.dense_lr)]
    pairs = torch.randn(BATCH, top_input_size(NUM_SPARSE, cfg.embedding_dim) - cfg.embedding_dim)
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> None:
        logits = top(torch.cat([bottom(batch.dense), pairs], dim=1)).squeeze(1)
        _step(optimizers, loss_fn(logits, batch.labels))

    step()
    benchmark(step)
    flops = 3 * (roofline.mlp_flops(NUM_DENSE, cfg.bottom_mlp)
                 + roofline.mlp_flops(interaction_size(NUM_SPARSE, cfg.embedding_dim), cfg.top_mlp))
    got = rates(benchmark, {"samples": BATCH})
    record(benchmark, {**got, "roofline_fraction": roofline.roofline_fraction(
        got["samples_per_s"], flops, reference["gemm_fp32_gflops"])})


def test_dlrm_training_step(benchmark, small, model, optimizers, batch, reference):
    """The whole model as dlrm.train steps it (fp32): forward, loss, backward, both optimizers."""
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> None:
        _step(optimizers.values(), loss_fn(model(batch.dense, batch.ids), batch.labels))

    step()
    benchmark(step)
    got = rates(benchmark, {"samples": BATCH})
    record(benchmark, {**got, "roofline_fraction": roofline.roofline_fraction(
        got["samples_per_s"], roofline.flops_per_sample(small.model, training=True), reference["gemm_fp32_gflops"])})
