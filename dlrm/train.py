"""Train DLRM data-parallel on CPU ranks, then evaluate on the test split.

    mpiexec -n W -genv MASTER_ADDR host -genv MASTER_PORT port \\
        python -m dlrm.train --config RUN/config.json --data PROCESSED_DIR --out RUN_DIR

Every rank holds the whole model, built from the same seed. Each step every rank
computes gradients on its B/W rows, then they are averaged over ranks: DDP
all-reduces the dense MLP gradients (bucketed, overlapped with backward), and
dist.allreduce_sparse_grads the embedding gradients - only the touched rows, all 26
tables in one collective (DDP would issue 26, which costs ~15x more on gloo).
Rank 0 writes RUN_DIR/train.json and RUN_DIR/model.pt.

Optimizers (the benchmark trains exactly one epoch, so they must converge fast):
  * embeddings: Adagrad at train.sparse_lr. Its per-coordinate step size shrinks with
    the squared gradients a row has seen, so rare ids (most rows of a Zipf-distributed
    table, seen a handful of times in one epoch) still take large steps while frequent
    ids settle; it accepts sparse gradients and only updates the touched rows.
    Plain SGD needs a warm-up/decay schedule tuned per dataset to get there.
  * MLPs: Adam at train.dense_lr, the usual robust choice for small dense nets.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.distributed as torch_dist
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench import config as bench_config
from bench.fsutil import atomic_write_json
from dlrm import data, dist, runner
from dlrm.model import DLRM
from preprocess.layout import ProcessedData

PROG = "dlrm.train"
PROGRESS_EVERY = 0.02  # of the steps
FINAL_LOSS_WINDOW = 0.01  # of the steps


def build_model(vocab_sizes: list[int], cfg: bench_config.Config
                ) -> tuple[DLRM, list[torch.optim.Optimizer], tuple[bool, str]]:
    """The model and its two optimizers (see the module docstring), IPEX-optimised when usable."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = DLRM(vocab_sizes, cfg.model)
    dense_opt: torch.optim.Optimizer = torch.optim.Adam(model.dense_parameters(), lr=cfg.train.dense_lr)
    ipex = dist.ipex_status()
    if ipex[0]:
        import intel_extension_for_pytorch  # only reached when the import is known to work

        # IPEX rewrites the MLP layers (and their optimizer); the embedding tables stay as they are.
        model, dense_opt = intel_extension_for_pytorch.optimize(model, optimizer=dense_opt, dtype=torch.float32)
    sparse_opt = torch.optim.Adagrad(model.embedding_parameters(), lr=cfg.train.sparse_lr)
    return model, [sparse_opt, dense_opt], ipex


def wrap_ddp(model: DLRM) -> DistributedDataParallel:
    """DDP for the dense MLPs only: the embedding tables are synchronised by allreduce_sparse_grads."""
    tables = [name for name, _ in model.named_parameters() if name.startswith("embeddings.")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, tables)
    # DDP does not broadcast ignored parameters: identical tables come from the shared seed.
    return DistributedDataParallel(model)


def train(rank: runner.Rank, ddp: nn.Module, optimizers: list[torch.optim.Optimizer],
          train_data: ProcessedData, global_batch: int, epochs: int) -> dict:
    """The training loop; returns throughput and the loss at the end."""
    info = rank.info
    steps = data.steps_per_epoch(len(train_data), global_batch) * epochs
    if steps == 0:
        raise ValueError(f"the train split has {len(train_data)} rows, fewer than one global batch "
                         f"of {global_batch}")
    loss_fn = nn.BCEWithLogitsLoss()
    report_every = max(1, round(steps * PROGRESS_EVERY))
    losses = np.zeros(steps)
    embeddings = ddp.module.embedding_parameters()

    ddp.train()
    torch_dist.barrier()  # all ranks start the clock together
    start = last_time = time.perf_counter()
    last_step = 0
    batches = data.train_batches(train_data, global_batch, info.rank, info.world_size, epochs)
    for step, (dense, ids, labels) in enumerate(batches, start=1):
        loss = loss_fn(ddp(dense, ids), labels)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()  # DDP averages the dense gradients over ranks during backward
        dist.allreduce_sparse_grads(embeddings)  # ... and this the embedding gradients
        for opt in optimizers:
            opt.step()
        losses[step - 1] = loss.item()

        if step % report_every == 0 or step == steps:
            now = time.perf_counter()
            rate = (step - last_step) * global_batch / (now - last_time)
            window = losses[last_step:step]
            runner.progress(rank, stage="train", step=step, steps=steps, samples_per_s=round(rate, 1),
                            loss=round(float(window.mean()), 5))
            last_step, last_time = step, now
    torch_dist.barrier()  # the slowest rank decides the time
    seconds = time.perf_counter() - start

    # Mean over the last ~1% of steps and over all ranks (each rank saw different rows).
    window = max(1, math.ceil(steps * FINAL_LOSS_WINDOW))
    final_loss = torch.tensor(losses[-window:].mean(), dtype=torch.float64)
    torch_dist.all_reduce(final_loss)
    return {
        "samples_per_s": steps * global_batch / seconds,
        "seconds": seconds,
        "steps": steps,
        "samples": steps * global_batch,
        "final_loss": final_loss.item() / info.world_size,
    }


@torch.inference_mode()
def predict(model: nn.Module, batches: Iterable[data.Batch]) -> tuple[np.ndarray, np.ndarray]:
    """Click probabilities and labels for a stream of batches."""
    model.eval()
    probs, labels = [], []
    for dense, ids, label in batches:
        probs.append(torch.sigmoid(model(dense, ids)).numpy())
        labels.append(label.numpy())
    if not probs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs), np.concatenate(labels)


def click_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Exact ROC AUC, log loss and accuracy at 0.5 over the whole split."""
    both_classes = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, probs)) if both_classes else None,
        "logloss": float(log_loss(labels, probs.astype(np.float64), labels=[0, 1])),
        "accuracy": float(np.mean((probs >= 0.5) == (labels >= 0.5))),
    }


def evaluate(rank: runner.Rank, model: nn.Module, test_data: ProcessedData, batch_size: int) -> dict | None:
    """Each rank predicts its shard of the test split; rank 0 scores all of them (None elsewhere)."""
    info = rank.info
    start = time.perf_counter()
    probs, labels = predict(model, data.eval_batches(test_data, batch_size, info.rank, info.world_size))
    gathered = dist.all_gather((probs, labels))  # shards arrive in rank order
    if not rank.is_main:
        return None
    all_probs = np.concatenate([p for p, _ in gathered])
    all_labels = np.concatenate([y for _, y in gathered])
    if len(all_labels) != len(test_data):
        raise RuntimeError(f"evaluated {len(all_labels)} test rows, expected {len(test_data)}")
    return {**click_metrics(all_labels, all_probs), "test_rows": len(all_labels),
            "eval_seconds": time.perf_counter() - start}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="resolved run configuration (config.json)")
    parser.add_argument("--data", type=Path, required=True, help="processed data folder (has manifest.json)")
    parser.add_argument("--out", type=Path, required=True, help="run folder for train.json and model.pt")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = bench_config.load(args.config)
    backend = dist.choose_backend()
    # The sparse gradients are built from valid tensors; skip the per-construction checks (and the warning).
    torch.sparse.check_sparse_tensor_invariants.disable()
    rank = runner.start(cfg, backend, expected_ranks=cfg.world_size, prog=PROG)
    info = rank.info
    global_batch = cfg.train.batch_size
    data.local_batch_size(global_batch, info.world_size)  # fail early if B/W is not whole

    train_data = ProcessedData(args.data, "train")
    test_data = ProcessedData(args.data, "test")
    vocab_sizes = train_data.vocab_sizes

    model, optimizers, ipex = build_model(vocab_sizes, cfg)
    ddp = wrap_ddp(model)

    runner.log(rank, f"{PROG}: {info.world_size} ranks ({info.launcher} launcher), backend {backend}, "
                     f"{rank.pinning['threads']} threads/rank, ipex: {ipex[1]}; "
                     f"{len(train_data)} train rows, global batch {global_batch}, {cfg.train.epochs} epoch(s)")
    result = train(rank, ddp, optimizers, train_data, global_batch, cfg.train.epochs)
    runner.log(rank, f"{PROG}: trained {result['samples']} samples in {result['seconds']:.1f}s "
                     f"({result['samples_per_s']:.0f} samples/s), final loss {result['final_loss']:.4f}")

    scores = evaluate(rank, model, test_data, cfg.train.eval_batch_size)
    pinning = dist.all_gather(rank.pinning)
    if rank.is_main:
        runner.log(rank, f"{PROG}: test AUC {scores['auc']}, logloss {scores['logloss']:.4f}, "
                         f"accuracy {scores['accuracy']:.4f} over {scores['test_rows']} rows")
        runner.save_atomically({"state_dict": model.state_dict(), "vocab_sizes": vocab_sizes,
                                "model_config": cfg.model.model_dump(mode="json")}, args.out / "model.pt")
        atomic_write_json(args.out / "train.json", {
            **result,
            "epochs": cfg.train.epochs,
            "batch_size": global_batch,
            "backend": backend,
            "ipex": {"used": ipex[0], "reason": ipex[1]},
            "world_size": info.world_size,
            "threads_per_rank": rank.pinning["threads"],
            "pinning": pinning,
            **scores,
        })
    torch_dist.barrier()  # no rank exits (and tears the group down) before rank 0 has written
    return 0


if __name__ == "__main__":
    sys.exit(runner.run(main, PROG))
