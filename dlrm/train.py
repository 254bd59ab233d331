"""Train DLRM on CPU ranks (hybrid parallel), evaluating as it goes, then on the whole test split.

    mpiexec -n W -genv MASTER_ADDR host -genv MASTER_PORT port \\
        python -m dlrm.train --config RUN/config.json --data PROCESSED_DIR --out RUN_DIR [--resume]

Parallelism (dlrm.sharding): the MLPs are data-parallel - every rank holds them, computes
gradients on its B/W rows of the global batch, and all-reduces of a flat gradient buffer
sum them (dist.GradientBuffer; each rank's loss is scaled by 1/W, so the sum is the mean's
gradient). Tables of at least train.shard_min_rows rows are sharded: each lives on one
rank, which looks up the whole global batch's ids and exchanges the vectors (and, backward,
their gradients) with the other ranks in one all-to-all. Smaller tables are replicated;
their gradients ride in the MLPs' buffer when dense, else one sparse all-reduce sums them.
The collectives run while the rank computes: the all-to-all during the bottom MLP (forward)
and the bottom MLP's backward, the top MLP's all-reduce during the rest of backward, the
bottom MLP's while the owned tables are updated. When all ranks share one node (and the
backend is gloo) both go through shared memory instead (dlrm.shm, train.shared_memory): the
dense gradients are offered when backward has completed them all (backward accumulating them
straight into the shared file) and summed once the owned tables are updated, and the MLPs' updated
shares are exchanged around the small tables' update: work between offering and reading absorbs the
other ranks' lateness, as the bottom MLP does for the exchange.
3-7x faster than gloo's sockets, whose threads also took the ranks' cores from the computation.
Every rank builds the same initial model from the seed (each table from its own generator,
wherever it lives).
Rank 0 writes RUN_DIR/train.json and RUN_DIR/model.pt (the whole model, the sharded tables
gathered from their owners, in the format dlrm.inference loads).

Optimizers (the benchmark trains exactly one epoch, so they must converge fast):
  * embeddings: Adagrad at train.sparse_lr (or row-wise Adagrad, or SGD: train.sparse_optimizer),
    updating only the rows a batch touched (dlrm.optim.SparseOptimizer);
  * MLPs: Adam at train.dense_lr, the usual robust choice for small dense nets; with the
    shared-memory collectives each rank steps its share of the parameters and the ranks exchange
    the updated values (dlrm.split_adam), otherwise every rank steps them all.
  Both base rates follow the MLPerf DLRM schedule when it is set (see lr_scale).

Options (train.* in the profile, all off in the small profiles):
  * precision    bf16 autocast around forward and loss; the weights, the optimizer state
                 and every evaluation stay fp32.
  * evaluation   every eval_every_steps on the test split (or its first eval_rows rows),
                 stopping early once the AUC reaches target_auc. Training throughput
                 does not count the time spent evaluating or checkpointing.
  * checkpoints  every checkpoint_every_steps to RUN_DIR/checkpoint.pt (the whole model and
                 optimizer state, gathered like model.pt). --resume (or train.resume when the
                 file exists) continues from it where it stopped: the same rows, weights,
                 optimizer state and loss history, so the same result.

Before the clock starts, each rank times its loader alone on the first batches
(loader.samples_per_s: global-batch samples per second it could feed; its ratio to the
training rate says whether the loader could starve training). Every GEMM_SAMPLE_EVERY of the
steps, off the clock, each rank samples the GEMM rate of its cores (the roofline's ceiling: train.json
gemm_in_run), all ranks side by side as they train.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as torch_dist
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from bench import config as bench_config
from bench.fsutil import atomic_write_json
from dlrm import data, dist, interaction_kernel, mlp, optim, roofline, runner, sharding, shm
from dlrm.interaction_kernel import InteractionKernel
from dlrm.mlp import MLPKernel
from dlrm.model import DLRM, EmbeddingTables
from dlrm.optim import SparseOptimizer, SparseUpdateKernel
from dlrm.sharding import ShardedEmbeddings, ShardingPlan
from dlrm.split_adam import SplitAdam
from preprocess.layout import ProcessedData

PROG = "dlrm.train"
PROGRESS_EVERY = 0.02  # of the steps
FINAL_LOSS_WINDOW = 0.01  # of the steps
LOADER_BATCHES = 200  # timed before training
GEMM_SAMPLE_EVERY = 0.05  # of the steps: the roofline's GEMM rate sampled in the run (roofline.GemmProbe) ...
GEMM_SAMPLE_S = 0.1  # ... for this long each time, off the clock
CHECKPOINT = "checkpoint.pt"  # in RUN_DIR
PHASES = ("data", "forward", "backward", "gradient_sync", "optimizer")


def build_model(vocab_sizes: list[int], cfg: bench_config.Config, plan: ShardingPlan | None = None,
                rank: int = 0, kernel: InteractionKernel | None = None, update: SparseUpdateKernel | None = None,
                mlp_kernel: MLPKernel | None = None) -> tuple[DLRM, list[torch.optim.Optimizer], tuple[bool, str]]:
    """The model (rank ``rank``'s share of it under ``plan``; None: all tables here; ``kernel``: its
    compiled interaction, ``mlp_kernel``: its MLPs' fused passes) and its two optimizers, [embeddings
    (``update``: their compiled sparse update), MLPs] (see the module docstring), IPEX-optimised when usable."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    embeddings = None if plan is None else ShardedEmbeddings(plan, rank, cfg.model.embedding_dim)
    model = DLRM(vocab_sizes, cfg.model, embeddings, kernel, mlp_kernel)
    ipex = dist.ipex_status()
    if ipex[0]:
        import intel_extension_for_pytorch  # only reached when the import is known to work

        # IPEX rewrites the MLP layers and swaps in its own fused optimizer; the tables stay as they are.
        dense_opt: torch.optim.Optimizer = torch.optim.Adam(model.dense_parameters(), lr=cfg.train.dense_lr)
        model, dense_opt = intel_extension_for_pytorch.optimize(model, optimizer=dense_opt, dtype=torch.float32)
    else:
        # fused: one kernel over all the MLP parameters instead of a dozen ops per tensor.
        dense_opt = torch.optim.Adam(model.dense_parameters(), lr=cfg.train.dense_lr, fused=True)
    sparse_opt = SparseOptimizer(model.embedding_parameters(), lr=cfg.train.sparse_lr, rule=cfg.train.sparse_optimizer,
                                 kernel=update)
    return model, [sparse_opt, dense_opt], ipex


def gradient_buckets(model: DLRM) -> tuple[list[list[torch.nn.Parameter]], list[torch.nn.Parameter]]:
    """The dense gradients' all-reduce buckets - the top MLP's, summed as soon as backward is past
    it, then the bottom MLP's with those of the tables with dense gradients (through shared memory
    all in one: dist.GradientBuffer) - and the weights with sparse gradients
    (ShardedEmbeddings.reduce_sparse_gradients sums those)."""
    tables = [m for m in model.modules() if isinstance(m, EmbeddingTables)]
    buckets = [list(model.top.parameters()), [*model.bottom.parameters(), *(m.weight for m in tables if not m.sparse)]]
    return buckets, [m.weight for m in tables if m.sparse]


def open_shared_memory(rank: runner.Rank, model: DLRM, cfg: bench_config.Config
                       ) -> tuple[shm.SharedMemoryGroup | None, str]:
    """When this job can use them (a collective): the shared-memory group that sums the dense
    gradients, and the one the sharded tables' exchange then goes through; and why (not)."""
    dim, world = cfg.model.embedding_dim, rank.info.world_size
    # All the dense gradients (dist.GradientBuffer sums them in one call), more than a SplitAdam share.
    gradients = sum(p.numel() for bucket in gradient_buckets(model)[0] for p in bucket)
    tables: ShardedEmbeddings = model.embeddings
    # The most an exchange sends from one rank: every row of a global (training or evaluation) batch,
    # of all the sharded tables (forward: those it owns; backward: its rows of everybody's).
    sharded = sum(tables.tables_per_rank)
    exchange = max(cfg.train.batch_size, cfg.train.eval_batch_size * world) * sharded * dim
    why_not = shm.unavailable(rank.info, rank.backend, gradients + exchange) if cfg.train.shared_memory \
        else "train.shared_memory is false"
    # Every rank must take the same path (each read /dev/shm's free space at its own moment).
    why_not = next((reason for reason in dist.all_gather(why_not) if reason is not None), None)
    if why_not is not None:
        return None, f"{why_not}: the {rank.backend} backend sums the gradients and exchanges the vectors"
    group = shm.open_group(rank.info.rank, world, gradients)
    if sharded:
        tables.exchange_through(shm.open_group(rank.info.rank, world, exchange))
    return group, f"the {world} ranks share this node: gradients summed and vectors exchanged in {shm.SHM_DIR}"


def step_dense(optimizer: torch.optim.Optimizer | SplitAdam, meanwhile: Callable[[], None]) -> None:
    """The MLPs' optimizer step, and ``meanwhile`` (work not touching the MLPs): while a split Adam waits
    for the other ranks' shares, where it absorbs their lateness, else after the step."""
    if isinstance(optimizer, SplitAdam):
        optimizer.step(meanwhile)
    else:
        optimizer.step()
        meanwhile()


def lr_scale(step: int, warmup_steps: int, decay_start_step: int, decay_steps: int) -> float:
    """The factor on the base learning rates at optimizer step ``step`` (counted from 1).

    MLPerf DLRM's schedule (the reference's LRPolicyScheduler): a linear warm-up
    step/warmup_steps up to 1, then 1, then from decay_start_step a power-2 polynomial
    decay reaching 0 after decay_steps steps (decay_steps 0: no decay). Unlike the
    reference, the constant phase is exactly 1 (not (W-1)/W), there is no 1e-7 floor,
    and the rate stays 0 after the decay (the reference freezes its last value).
    """
    if step < warmup_steps:
        return step / warmup_steps
    if decay_steps == 0 or step < decay_start_step:
        return 1.0
    remaining = max(0, decay_start_step + decay_steps - step)
    return (remaining / decay_steps) ** 2


def resolve_precision(setting: str) -> str:
    """"auto" is bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32."""
    if setting == "auto":
        return "bf16" if roofline.bf16_native() else "fp32"
    return setting


def autocast(precision: str) -> torch.autocast:
    """Matmuls in bf16 when asked; parameters, gradients and the optimizers stay fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def full_state_dict(model: DLRM) -> dict | None:
    """The whole model's state dict (DLRM's own layout, all tables) on rank 0, None on the others.
    A collective: the sharded tables are gathered from their owners."""
    tables: ShardedEmbeddings = model.embeddings
    weight = tables.gather(tables.replicated.weight.detach(), tables.local.weight.detach())
    if weight is None:
        return None
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("embeddings.")}
    return {**state, "embeddings.weight": weight}


def load_full_state_dict(model: DLRM, state: dict) -> None:
    """``full_state_dict``'s inverse on every rank: its own tables' rows and the MLPs."""
    tables: ShardedEmbeddings = model.embeddings
    replicated, local = tables.split(state["embeddings.weight"])
    mlps = {name: tensor for name, tensor in state.items() if not name.startswith("embeddings.")}
    model.load_state_dict({**mlps, "embeddings.replicated.weight": replicated, "embeddings.local.weight": local})


def save_checkpoint(rank: runner.Rank, path: Path, model: DLRM, optimizers: list[torch.optim.Optimizer],
                    step: int, global_batch: int, losses: np.ndarray, auc_curve: list[dict]) -> None:
    """Everything needed to continue after ``step`` as if never stopped. Every rank calls this.

    The model and the tables' Adagrad state are gathered whole to rank 0; so is the MLPs' Adam
    state when it is split (it is the same on every rank otherwise); the loss history (each rank saw different rows) and
    the RNG state are per rank. The loader position is ``step``.
    """
    sparse_opt, dense_opt = optimizers
    tables: ShardedEmbeddings = model.embeddings
    state = full_state_dict(model)
    sums = tables.gather(sparse_opt.state_sum(tables.replicated.weight), sparse_opt.state_sum(tables.local.weight))
    dense_state = dense_opt.state_dict()  # (a collective when the optimizer is split: SplitAdam)
    mine = {"losses": torch.from_numpy(losses[:step].copy()), "rng": torch.get_rng_state()}
    per_rank = dist.all_gather(mine)
    if rank.is_main:
        runner.save_atomically({
            "step": step, "world_size": rank.info.world_size, "batch_size": global_batch,
            "model": state, "embedding_adagrad_sum": sums, "dense_optimizer": dense_state,
            "per_rank": per_rank, "auc_curve": auc_curve,
        }, path)
    torch_dist.barrier()  # no rank moves on (or stops) before the file is complete


def load_checkpoint(rank: runner.Rank, path: Path, model: DLRM, optimizers: list[torch.optim.Optimizer],
                    global_batch: int) -> dict:
    """Restore the model, the optimizers and this rank's RNG; return the step, loss history and AUC curve."""
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if (saved["world_size"], saved["batch_size"]) != (rank.info.world_size, global_batch):
        raise ValueError(f"{path} was written by {saved['world_size']} ranks at global batch {saved['batch_size']}; "
                         f"this run has {rank.info.world_size} ranks at global batch {global_batch}")
    sparse_opt, dense_opt = optimizers
    tables: ShardedEmbeddings = model.embeddings
    load_full_state_dict(model, saved["model"])
    for weight, sums in zip((tables.replicated.weight, tables.local.weight),
                            tables.split(saved["embedding_adagrad_sum"])):
        sparse_opt.state_sum(weight).copy_(sums)
    dense_opt.load_state_dict(saved["dense_optimizer"])
    state_in_parameter_layout(dense_opt)
    mine = saved["per_rank"][rank.info.rank]
    torch.set_rng_state(mine["rng"])
    return {"step": saved["step"], "losses": mine["losses"].numpy(), "auc_curve": saved["auc_curve"]}


def state_in_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Lay out each parameter-shaped state tensor (Adam's moments) in its parameter's memory layout.
    load_state_dict keeps the saved layout, and fused Adam walks a parameter and its moments as flat
    arrays: a checkpoint written before the first layer became column-major (dlrm.model.column_major)
    holds its moments row-major, which would silently mix up that layer's entries."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and not dist.same_layout(value, param):
                    state[key] = torch.empty_like(param).copy_(value)


def time_loader(train_data: ProcessedData, global_batch: int, rank: runner.Rank, plan: ShardingPlan,
                batches: int) -> dict:
    """This rank's loader alone on the first ``batches`` batches: the global-batch samples per
    second it could feed (every rank reads its share of each global batch at this pace)."""
    info = rank.info
    start = time.perf_counter()
    count = 0
    for _ in data.train_batches(train_data, global_batch, info.rank, info.world_size, plan=plan):
        count += 1
        if count == batches:
            break
    seconds = time.perf_counter() - start
    return {"batches": count, "seconds": seconds, "samples_per_s": count * global_batch / seconds}


def train(rank: runner.Rank, model: DLRM, optimizers: list[torch.optim.Optimizer],
          train_data: ProcessedData, test_data: ProcessedData, cfg: bench_config.Config, precision: str,
          checkpoint: Path, resume: dict | None = None, stop_after: int | None = None,
          shared_memory: shm.SharedMemoryGroup | None = None) -> dict | None:
    """The training loop; returns throughput, the loss at the end, the AUC curve so far and the
    seconds spent in each phase of a step (PHASES; forward and backward include the waits for the
    all-to-alls, gradient_sync the waits for the all-reduces).

    ``resume``: what load_checkpoint returned. ``stop_after``: stop after that step
    without a result (None is returned), as if the job had been killed there. ``shared_memory``:
    the dense gradients' all-reduce (open_shared_memory); None: the backend's.
    """
    info, opts, global_batch = rank.info, cfg.train, cfg.train.batch_size
    steps = data.steps_per_epoch(len(train_data), global_batch) * opts.epochs
    if steps == 0:
        raise ValueError(f"the train split has {len(train_data)} rows, fewer than one global batch "
                         f"of {global_batch}")
    tables: ShardedEmbeddings = model.embeddings
    buckets, sparse_weights = gradient_buckets(model)
    grads = dist.GradientBuffer(buckets, shared_memory)
    sparse_opt, dense_opt = optimizers
    base_lrs = [opts.sparse_lr, opts.dense_lr]  # build_model's optimizer order
    loss_fn = nn.BCEWithLogitsLoss()
    report_every = max(1, round(steps * PROGRESS_EVERY))
    losses = np.zeros(steps)
    auc_curve: list[dict] = []
    first = 0  # steps already taken
    if resume is not None:
        first = resume["step"]
        losses[:first] = resume["losses"]
        auc_curve = resume["auc_curve"]
    phases = dict.fromkeys(PHASES, 0.0)
    early_stopped = False
    # The ceiling of the roofline fraction, sampled on this rank's cores while the others sample theirs:
    # the host's clock moves (here 168 GFLOP/s most of the time, bursts of 200-213 for a second or so), and
    # the run's GEMMs ran at whatever it was meanwhile.
    probe = roofline.GemmProbe(roofline.DTYPES[precision])
    sample_every = max(1, round(steps * GEMM_SAMPLE_EVERY))

    model.train()
    torch_dist.barrier()  # all ranks start the clock together
    start = last_time = time.perf_counter()
    step = last_step = first
    batches = data.train_batches(train_data, global_batch, info.rank, info.world_size, opts.epochs, start=first,
                                 plan=tables.plan)
    for step in range(first + 1, steps + 1):
        t0 = time.perf_counter()
        dense, ids, labels = next(batches)
        scale = lr_scale(step, opts.warmup_steps, opts.decay_start_step, opts.decay_steps)
        for opt, base_lr in zip(optimizers, base_lrs):
            for group in opt.param_groups:
                group["lr"] = base_lr * scale
        t1 = time.perf_counter()
        with autocast(precision):
            loss = loss_fn(model(dense, ids), labels)
        grads.zero()
        for weight in sparse_weights:
            weight.grad = None
        t2 = time.perf_counter()
        # This rank's share of the global batch's mean loss: summed over the ranks, the gradients are the mean's.
        (loss / info.world_size).backward()  # the all-to-all and the dense gradients' all-reduces run meanwhile
        t3 = time.perf_counter()
        sparse_opt.update(tables.local.weight)  # complete: the all-to-all returned every rank's rows
        t4 = time.perf_counter()
        grads.wait()  # the MLPs' (and small tables') gradients, summed over the ranks
        tables.reduce_sparse_gradients()  # the replicated tables', if sparse
        t5 = time.perf_counter()
        step_dense(dense_opt, meanwhile=lambda: sparse_opt.update(tables.replicated.weight))
        losses[step - 1] = loss.item()
        t6 = time.perf_counter()
        for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5 + t4 - t3)):
            phases[name] += seconds

        if step % report_every == 0 or step == steps:
            now = time.perf_counter()
            rate = (step - last_step) * global_batch / (now - last_time)
            window = losses[last_step:step]
            runner.progress(rank, stage="train", step=step, steps=steps, samples_per_s=round(rate, 1),
                            loss=round(float(window.mean()), 5))
            last_step, last_time = step, now

        pause_start = time.perf_counter()
        if step % sample_every == 0 or step == steps:
            probe.sample(GEMM_SAMPLE_S)
        if opts.eval_every_steps and step % opts.eval_every_steps == 0 and step < steps:
            scores = evaluate(rank, model, test_data, opts.eval_batch_size, rows=opts.eval_rows, plan=tables.plan)
            auc_curve.append(report_eval(rank, scores, step, steps, global_batch))
            early_stopped = opts.target_auc is not None and (scores["auc"] or 0.0) >= opts.target_auc
        # (Not when stopping early: a resumed run retrains to this step and stops here again.)
        if opts.checkpoint_every_steps and step % opts.checkpoint_every_steps == 0 and not early_stopped:
            save_checkpoint(rank, checkpoint, model, optimizers, step, global_batch, losses, auc_curve)
        # The clock measures training alone: move it past the evaluation and the checkpoint.
        paused = time.perf_counter() - pause_start
        start, last_time = start + paused, last_time + paused
        if early_stopped or step == stop_after:
            break
    torch_dist.barrier()  # the slowest rank decides the time
    seconds = time.perf_counter() - start
    if step == stop_after and step < steps and not early_stopped:
        return None
    if not probe.readings:  # stopped early before the first sampling step (all ranks stop at the same step)
        probe.sample(GEMM_SAMPLE_S)

    # Mean over the last ~1% of the steps taken and over all ranks (each rank saw different rows).
    window = max(1, math.ceil(step * FINAL_LOSS_WINDOW))
    final_loss = torch.tensor(losses[step - window:step].mean(), dtype=torch.float64)
    torch_dist.all_reduce(final_loss)
    return {
        "samples_per_s": (step - first) * global_batch / seconds,  # of this run (a resumed one starts at first)
        "seconds": seconds,
        "steps": step,
        "samples": step * global_batch,
        "final_loss": final_loss.item() / info.world_size,
        "early_stopped": early_stopped,
        "auc_curve": auc_curve,
        "phase_seconds": phases,
        "gemm_readings": probe.readings,
    }


@torch.inference_mode()
def predict(model: nn.Module, batches: Iterable[data.Batch], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Click probabilities and labels for a stream of batches of ``rows`` rows in all (in fp32,
    whatever the training precision).

    Written into arrays allocated up front: a small array kept per batch lands between the
    batch's freed activations and fragments the heap (RSS grew ~0.5 MB per 1024-row batch,
    +125-290 MB over the small profile's test split)."""
    was_training = model.training
    model.eval()
    probs, labels = np.empty(rows, np.float32), np.empty(rows, np.float32)
    done = 0
    for dense, ids, label in batches:
        end = done + len(label)
        torch.sigmoid(model(dense, ids), out=torch.from_numpy(probs[done:end]))
        labels[done:end] = label.numpy()
        done = end
    model.train(was_training)
    if done != rows:
        raise RuntimeError(f"predicted {done} rows, expected {rows}")
    return probs, labels


def click_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Exact ROC AUC, log loss and accuracy at 0.5 over the whole split."""
    both_classes = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, probs)) if both_classes else None,
        "logloss": float(log_loss(labels, probs.astype(np.float64), labels=[0, 1])),
        "accuracy": float(np.mean((probs >= 0.5) == (labels >= 0.5))),
    }


def evaluate(rank: runner.Rank, model: nn.Module, test_data: ProcessedData, batch_size: int,
             rows: int | None = None, plan: ShardingPlan | None = None) -> dict:
    """Each rank predicts its shard of the test split (or of its first ``rows`` rows); rank 0
    scores all of them and every rank gets the scores. ``plan``: the model's tables are
    sharded so (the ranks then step through their shards together)."""
    info = rank.info
    start = time.perf_counter()
    expected = len(test_data) if rows is None else min(rows, len(test_data))
    batches = data.eval_batches(test_data, batch_size, info.rank, info.world_size, rows, plan)
    shard_start, shard_stop = data.shard_range(expected, info.rank, info.world_size)
    probs, labels = predict(model, batches, shard_stop - shard_start)
    gathered = dist.all_gather((probs, labels))  # shards arrive in rank order
    scores = None
    if rank.is_main:
        all_probs = np.concatenate([p for p, _ in gathered])
        all_labels = np.concatenate([y for _, y in gathered])  # each shard's row count checked by predict
        scores = {**click_metrics(all_labels, all_probs), "test_rows": len(all_labels),
                  "eval_seconds": time.perf_counter() - start}
    return dist.broadcast(scores)


def report_eval(rank: runner.Rank, scores: dict, step: int, steps: int, global_batch: int) -> dict:
    """The auc_curve entry of an evaluation after ``step`` steps, also printed as a PROGRESS line."""
    point = {"step": step, "samples": step * global_batch, "auc": scores["auc"], "loss": scores["logloss"],
             "rows": scores["test_rows"]}
    runner.progress(rank, stage="eval", step=step, steps=steps, samples=point["samples"], rows=point["rows"],
                    auc=None if point["auc"] is None else round(point["auc"], 5), loss=round(point["loss"], 5),
                    samples_per_s=round(point["rows"] / scores["eval_seconds"], 1))  # rows evaluated per second
    return point


def memory_estimate(model: DLRM, cfg: bench_config.Config, world_size: int, runtime_bytes: int,
                    adam_elements: int) -> dict:
    """What this rank should hold at its peak, in bytes: ``runtime_bytes`` (the process before the
    model: Python, torch, the libraries), its tables and their optimizer state (Adagrad's as large,
    row-wise Adagrad's 1/d of it, SGD's none; and the compiled update's int32 map of the table
    rows), the MLPs with their gradients and two Adam moments for each of the ``adam_elements``
    parameters this rank steps (all of them, or its share: dlrm.split_adam), the activations of the larger of a
    training step and an evaluation batch, a few input batches, the GEMM probe's matrices (train's
    roofline samples), and on rank 0 all the tables gathered for model.pt (and, with checkpoints, their
    optimizer state)."""
    floats = 4
    tables = sum(p.numel() for p in model.embedding_parameters()) * floats
    mlps = sum(p.numel() for p in model.dense_parameters()) * floats
    dim = cfg.model.embedding_dim
    features = len(model.vocab_sizes) + 1
    interaction = features * dim + features * features + model.top[0].in_features  # T, Z, top input
    sharded: ShardedEmbeddings = model.embeddings
    owned = len(sharded.plan.owned(sharded.rank)) * dim  # per row of the global batch: the owner's lookups
    # Training, per sample: every layer's output and its gradient, the interaction's and their gradients;
    # and the owned lookups (and their gradients) for the whole global batch.
    local_batch = cfg.train.batch_size // world_size
    train = local_batch * 2 * (sum(cfg.model.bottom_mlp) + sum(cfg.model.top_mlp) + interaction) \
        + 2 * cfg.train.batch_size * owned
    # Evaluation (no gradients): the interaction's tensors and the widest layer's input and output,
    # and the owned lookups for every rank's batch.
    widest = max(cfg.model.bottom_mlp + cfg.model.top_mlp)
    evaluation = cfg.train.eval_batch_size * (interaction + 2 * widest + world_size * owned)
    batches = 3 * max(local_batch, cfg.train.eval_batch_size) * (13 * 4 + 26 * 8 + 4)  # dense, ids, labels
    columns = optim.state_columns(cfg.train.sparse_optimizer, dim)  # optimizer state per table row
    gathered = 0
    if sharded.rank == 0:
        gathered = sum(model.vocab_sizes) * (dim + (columns if cfg.train.checkpoint_every_steps else 0)) * floats
    rows = sum(p.shape[0] for p in model.embedding_parameters())
    state = rows * columns * floats
    row_maps = rows * 4  # (at most: dense-gradient tables have none)
    probe = 3 * roofline.PROBE_N**2 * roofline.DTYPES[resolve_precision(cfg.train.precision)].itemsize
    parts = {"runtime": runtime_bytes, "tables": tables, "optimizer_state": state + row_maps,
             "mlps": 2 * mlps + 2 * adam_elements * floats,
             "activations": max(train, evaluation) * floats, "batches": batches, "gemm_probe": probe,
             "gathered": gathered}
    return {**parts, "total": sum(parts.values())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = runner.entry_parser(PROG, __doc__, out_help="run folder for train.json and model.pt")
    parser.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT} (must exist)")
    parser.add_argument("--stop-after-steps", type=int, metavar="N",
                        help="debugging: stop after step N without a result, as if killed there")
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
    precision = resolve_precision(cfg.train.precision)

    train_data = ProcessedData(args.data, "train")
    test_data = ProcessedData(args.data, "test")
    vocab_sizes = train_data.vocab_sizes
    plan = sharding.plan_tables(vocab_sizes, info.world_size, cfg.train.shard_min_rows,
                                global_batch // info.world_size)
    # torch.optim's first optimizer imports torch._dynamo (and sympy with it): ~70 MB of libraries that
    # belong to the runtime, not to the model's state. Loaded here, before the runtime is measured.
    importlib.import_module("torch._dynamo")
    runtime_bytes = runner.peak_rss_bytes()

    kernel, kernel_status = interaction_kernel.load()
    update, update_status = optim.load_kernel()
    mlp_kernel, mlp_status = mlp.load()
    model, optimizers, ipex = build_model(vocab_sizes, cfg, plan, info.rank, kernel, update, mlp_kernel)
    shared_memory, shared_memory_status = open_shared_memory(rank, model, cfg)
    dense_split = shared_memory is not None and not ipex[0]  # (IPEX brings its own optimizer)
    if dense_split:
        optimizers[1] = SplitAdam(model.dense_parameters(), cfg.train.dense_lr, info.rank, info.world_size,
                                  shared_memory)
    # The MLP parameters whose Adam moments this rank holds.
    adam_elements = sum(p.numel() for p in model.dense_parameters()) if not dense_split \
        else sum(optimizers[1].share_sizes[info.rank])
    checkpoint = args.out / CHECKPOINT
    resume = None
    if args.resume or (cfg.train.resume and checkpoint.is_file()):
        resume = load_checkpoint(rank, checkpoint, model, optimizers, global_batch)
        runner.log(rank, f"{PROG}: resuming from {checkpoint} at step {resume['step']}")

    runner.log(rank, f"{PROG}: {info.world_size} ranks ({info.launcher} launcher), backend {backend}, "
                     f"{rank.pinning['threads']} threads/rank, ipex: {ipex[1]}, precision {precision}, "
                     f"interaction kernel: {kernel_status}; MLP kernel: {mlp_status}; tables' {cfg.train.sparse_optimizer} update: {update_status}; "
                     f"{len(train_data)} train rows, global batch {global_batch}, {cfg.train.epochs} epoch(s); "
                     f"tables: {len(plan.replicated)} replicated, "
                     f"{'/'.join(str(len(plan.owned(r))) for r in range(info.world_size))} sharded per rank")
    runner.log(rank, f"{PROG}: collectives: {shared_memory_status}; the MLPs' Adam "
                     + ("split between the ranks" if dense_split else "replicated on every rank"))
    loader = time_loader(train_data, global_batch, rank, plan, LOADER_BATCHES)
    result = train(rank, model, optimizers, train_data, test_data, cfg, precision, checkpoint, resume,
                   args.stop_after_steps, shared_memory)
    if result is None:
        runner.log(rank, f"{PROG}: stopped after step {args.stop_after_steps} (--stop-after-steps)")
        return 0
    runner.log(rank, f"{PROG}: trained {result['samples']} samples in {result['seconds']:.1f}s "
                     f"({result['samples_per_s']:.0f} samples/s), final loss {result['final_loss']:.4f}"
                     + (" (stopped early: target AUC reached)" if result["early_stopped"] else ""))

    scores = evaluate(rank, model, test_data, cfg.train.eval_batch_size, plan=plan)
    result["auc_curve"].append(report_eval(rank, scores, result["steps"], result["steps"], global_batch))
    state = full_state_dict(model)
    per_rank = dist.all_gather({"pinning": rank.pinning, "peak_rss_bytes": runner.peak_rss_bytes(),
                                "memory_estimate_bytes": memory_estimate(model, cfg, info.world_size, runtime_bytes,
                                                                         adam_elements),
                                "loader": loader, "phase_seconds": result.pop("phase_seconds"),
                                "gemm_readings": result.pop("gemm_readings")})
    if rank.is_main:
        runner.log(rank, f"{PROG}: test AUC {scores['auc']}, logloss {scores['logloss']:.4f}, "
                         f"accuracy {scores['accuracy']:.4f} over {scores['test_rows']} rows")
        runner.save_atomically({"state_dict": state, "vocab_sizes": vocab_sizes,
                                "model_config": cfg.model.model_dump(mode="json")}, args.out / "model.pt")
        loader_rate = min(r["loader"]["samples_per_s"] for r in per_rank)  # the slowest rank's loader
        atomic_write_json(args.out / "train.json", {
            **result,
            "epochs": cfg.train.epochs,
            "batch_size": global_batch,
            "precision": precision,
            "lr_schedule": {"dense_lr": cfg.train.dense_lr, "sparse_lr": cfg.train.sparse_lr,
                            "warmup_steps": cfg.train.warmup_steps, "decay_start_step": cfg.train.decay_start_step,
                            "decay_steps": cfg.train.decay_steps},
            "resumed_from_step": None if resume is None else resume["step"],
            "backend": backend,
            "ipex": {"used": ipex[0], "reason": ipex[1]},
            "interaction_kernel": {"used": kernel is not None, "reason": kernel_status},
            "sparse_update_kernel": {"used": update is not None, "reason": update_status},
            "mlp_kernel": {"used": mlp_kernel is not None, "reason": mlp_status},
            "shared_memory": {"used": shared_memory is not None, "reason": shared_memory_status},
            "dense_optimizer": "adam, split between the ranks" if dense_split else "adam, replicated",
            "world_size": info.world_size,
            "threads_per_rank": rank.pinning["threads"],
            "pinning": [r["pinning"] for r in per_rank],
            "ccl_environment": [r["pinning"]["ccl_environment"] for r in per_rank] if backend == "ccl" else None,
            "sharding": plan.describe(),
            "loader": {"samples_per_s": loader_rate, "ratio_to_training": loader_rate / result["samples_per_s"],
                       "per_rank": [r["loader"] for r in per_rank]},
            "phase_seconds": [r["phase_seconds"] for r in per_rank],
            "gemm_in_run": roofline.in_run_gemm([r["gemm_readings"] for r in per_rank], GEMM_SAMPLE_S, precision),
            "peak_rss_bytes": [r["peak_rss_bytes"] for r in per_rank],
            "memory_estimate_bytes": [r["memory_estimate_bytes"] for r in per_rank],
            **scores,
        })
    torch_dist.barrier()  # no rank exits (and tears the group down) before rank 0 has written
    return 0


if __name__ == "__main__":
    sys.exit(runner.run(main, PROG))
