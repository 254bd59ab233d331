"""The real thing: ranks started by the venv's mpiexec, talking over gloo.

  * the sharded lookups and their gradients (all-to-all, uneven batches, sparse all-reduce)
    equal those of one process holding all the tables; the gradient buffer sums;
  * dlrm.train on 2 ranks learns a learnable dataset and accounts for every row;
    evaluates along the way, checkpoints, and a run stopped and resumed ends exactly
    like the uninterrupted one; bf16 still learns, and stops early at a target AUC;
  * dlrm.inference runs on 2 ranks, and alone without any launcher.
"""

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.config import resolve
from dlrm import train
from dlrm.model import top_input_size
from tests.test_dlrm_data import write_processed

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
LAUNCHER_PREFIXES = ("PMI_", "MPI_", "OMPI_", "HYDRA_", "MASTER_")
LAUNCHER_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"}

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This environment without any launcher's variables (as if started from a plain shell)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_NAMES}
    return {**env, "PYTHONPATH": str(REPO)}


def run(args: list[str], ranks: int | None) -> subprocess.CompletedProcess:
    """``python args`` on ``ranks`` mpiexec ranks, or as a plain process when ranks is None."""
    python = [sys.executable, "-u", *args]
    cmd = python if ranks is None else [MPIEXEC, "-n", str(ranks), "-launcher", "fork",
                                        "-genv", "MASTER_ADDR", "127.0.0.1", "-genv", "MASTER_PORT",
                                        str(free_port()), *python]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


# --- the exchanges, checked against one process holding everything ---------------------------------

EXCHANGE_VOCAB = [40, 3, 60, 50, 5, 45]  # 40+ rows: sharded (3 ranks: 60 -> 0, 50 -> 1, 45 -> 2, 40 -> 2)
BATCH_SIZES = (3, 5, 0)  # uneven, one rank empty: like the last step of an evaluation


def exchange_worker(out: str, shared: bool = False) -> None:
    """Run on every rank: the sharded lookups and their gradients equal those of the whole tables
    (``shared``: exchanged through a dlrm.shm group), over two steps."""
    from dlrm import dist, shm
    from dlrm.model import EmbeddingTables
    from dlrm.sharding import ShardedEmbeddings, ShardedIds, plan_tables

    info = dist.launcher_env()
    dist.init(info, "gloo")
    plan = plan_tables(EXCHANGE_VOCAB, info.world_size, shard_min_rows=40, local_batch=1)
    assert not plan.replicated_dense  # 8 replicated rows, more than 1 row x 2 tables: sparse
    seeds = list(range(len(EXCHANGE_VOCAB)))
    whole = EmbeddingTables(list(range(len(EXCHANGE_VOCAB))), EXCHANGE_VOCAB, 3)
    whole.reset_parameters(seeds)
    mine = ShardedEmbeddings(plan, info.rank, 3)
    mine.reset_parameters(seeds)
    if shared:
        mine.exchange_through(shm.open_group(info.rank, info.world_size, capacity=sum(BATCH_SIZES) * 4 * 3))
    g = torch.Generator().manual_seed(0)  # the same global batches and output gradients on every rank
    for batch_sizes in (BATCH_SIZES, BATCH_SIZES[::-1]):  # a second step, the empty rank another
        ids = torch.stack([torch.randint(0, n, (sum(batch_sizes),), generator=g) for n in EXCHANGE_VOCAB], dim=1)
        grads = torch.randn(sum(batch_sizes), len(EXCHANGE_VOCAB), 3, generator=g)
        start = sum(batch_sizes[:info.rank])
        rows = slice(start, start + batch_sizes[info.rank])
        blocks = mine(ShardedIds(ids[rows, plan.replicated], ids[:, plan.owned(info.rank)], batch_sizes))
        got = torch.cat(blocks, dim=1)
        expected = whole(ids[rows])[:, mine.tables]
        torch.testing.assert_close(got, expected)
        # Every rank's loss is scaled by 1/W (as dlrm.train does): summed over the ranks, the gradients
        # are those of the whole batch's loss scaled alike.
        whole.weight.grad = mine.replicated.weight.grad = mine.local.weight.grad = None
        got.backward(grads[rows, mine.tables] / info.world_size)
        mine.reduce_sparse_gradients()
        whole(ids).backward(grads / info.world_size)
        reference = whole.weight.grad.to_dense()
        state = mine.gather(mine.replicated.weight.grad.to_dense(), mine.local.weight.grad.to_dense())
        if info.rank == 0:
            torch.testing.assert_close(state, reference)
        torch.distributed.barrier()
    Path(out, f"rank{info.rank}.ok").touch()
    dist.finish()


@pytest.mark.parametrize("shared", [False, True], ids=["gloo", "shared-memory"])
def test_sharded_lookups_and_gradients_equal_the_whole_tables(tmp_path, shared):
    code = f"from tests.test_dlrm_end_to_end import exchange_worker; exchange_worker({str(tmp_path)!r}, {shared})"
    run(["-c", code], ranks=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok", "rank2.ok"]


def gradient_buffer_worker(out: str, shared: bool) -> None:
    from dlrm import dist, shm

    info = dist.launcher_env()
    dist.init(info, "gloo")
    # params[0] is laid out column-major, like DLRM's first layer (dlrm.model.column_major).
    params = [torch.nn.Parameter(torch.zeros(3, 2).T), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(5))]
    group = shm.open_group(info.rank, info.world_size, capacity=15) if shared else None  # all the gradients
    buffer = dist.GradientBuffer([[params[0]], [params[1], params[2]]], group)
    for _ in range(3):  # zeroed between steps, accumulated into in place by backward
        buffer.zero()
        # Through shared memory backward accumulates in this rank's slot (each half in turn), summed into the buffer.
        in_buffer = params[0].grad.data_ptr() == buffer.flat.data_ptr()
        assert in_buffer is not shared and torch.equal(params[0].grad, torch.zeros(2, 3))
        # params[2] gets no gradient: its bucket is never complete in backward, so wait() sends it.
        loss = (info.rank + 1) * (params[0].sum() + 2 * params[1].sum())
        (loss / info.world_size).backward()
        buffer.wait()
        mean = sum(r + 1 for r in range(info.world_size)) / info.world_size
        assert torch.equal(params[0].grad, torch.full((2, 3), mean)) and torch.equal(params[1].grad, torch.full((4,), 2 * mean))
        assert torch.equal(params[2].grad, torch.zeros(5))
        assert params[0].grad.data_ptr() == buffer.flat.data_ptr()  # still a view of the buffer
        assert params[0].grad.stride() == params[0].stride() == (1, 2)  # fused Adam needs the same layout
    Path(out, f"rank{info.rank}.ok").touch()
    dist.finish()


@pytest.mark.parametrize("shared", [False, True], ids=["gloo", "shared-memory"])
def test_gradient_buffer_sums_over_the_ranks(tmp_path, shared):
    code = f"from tests.test_dlrm_end_to_end import gradient_buffer_worker; gradient_buffer_worker({str(tmp_path)!r}, {shared})"
    run(["-c", code], ranks=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok", "rank2.ok"]


# --- training and inference -------------------------------------------------------------------------

ROWS = {"train": 16384, "test": 3001, "val": 3000}  # 32 steps of the tiny profile's 512 rows
# Evaluate on 1000 test rows every 8 steps, checkpoint every 10; the 8 tables of 25+ rows sharded.
ALONG_THE_WAY = ["train.eval_every_steps=8", "train.eval_rows=1000", "train.checkpoint_every_steps=10",
                 "train.shard_min_rows=25"]


def train_run(run_dir: Path, processed: Path, overrides: list[str], *args: str, ranks: int = 2) -> dict:
    """dlrm.train on ``ranks`` ranks with the tiny profile and ``overrides``; the config, stdout and train.json."""
    cfg = resolve("tiny", ["inference.ranks=2", "inference.warmup_batches=1", "inference.max_batches=4",
                           *overrides])
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_json()))
    began = time.perf_counter()
    proc = run(["-m", "dlrm.train", "--config", str(run_dir / "config.json"), "--data", str(processed),
                "--out", str(run_dir), *args], ranks=ranks)
    result = run_dir / "train.json"
    return {"dir": run_dir, "data": processed, "cfg": cfg, "stdout": proc.stdout,
            "wall_seconds": time.perf_counter() - began,
            "result": json.loads(result.read_text()) if result.exists() else None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    return train_run(root / "run", write_processed(root / "processed", ROWS), ALONG_THE_WAY)


def test_training_learns_and_counts_every_row(trained):
    result, cfg = trained["result"], trained["cfg"]
    steps = ROWS["train"] // cfg.train.batch_size
    assert result["world_size"] == 2 and len(result["pinning"]) == 2
    assert result["steps"] == steps and result["samples"] == steps * cfg.train.batch_size
    assert result["test_rows"] == ROWS["test"]
    assert result["auc"] > 0.75  # the labels follow the column-0 id's parity (Bayes AUC ~0.85)
    assert 0 < result["final_loss"] < 0.6 and 0 < result["logloss"] < 0.6
    assert result["samples_per_s"] > 0 and result["seconds"] > 0
    assert 0 < result["eval_seconds"] < trained["wall_seconds"]  # a duration, not a clock reading
    assert result["backend"] == "gloo" and result["ipex"]["used"] is False
    has_compiler = (shutil.which("cc") or shutil.which("gcc")) is not None
    assert result["interaction_kernel"]["used"] == has_compiler  # with a compiler: the compiled one
    assert result["sparse_update_kernel"]["used"] == has_compiler, result["sparse_update_kernel"]
    assert result["mlp_kernel"]["used"] == has_compiler, result["mlp_kernel"]
    # Both ranks on this node: the dense gradients are summed in shared memory (on x86-64, with room in /dev/shm).
    shared = result["shared_memory"]
    assert shared["used"] is (platform.machine() == "x86_64") or shared["reason"].startswith("/dev/shm has "), shared
    # Through shared memory the MLPs' Adam is split between the ranks.
    assert result["dense_optimizer"] == ("adam, split between the ranks" if shared["used"] else "adam, replicated")
    assert result["threads_per_rank"] >= 1
    assert result["precision"] == "fp32" and result["early_stopped"] is False and result["resumed_from_step"] is None
    assert result["lr_schedule"] == {"dense_lr": cfg.train.dense_lr, "sparse_lr": cfg.train.sparse_lr,
                                     "warmup_steps": 0, "decay_start_step": 0, "decay_steps": 0}
    assert len(result["peak_rss_bytes"]) == 2 and all(b > 50 << 20 for b in result["peak_rss_bytes"])
    for rank, (peak, estimate) in enumerate(zip(result["peak_rss_bytes"], result["memory_estimate_bytes"])):
        parts = ("runtime", "tables", "optimizer_state", "mlps", "activations", "batches", "gemm_probe", "gathered")
        assert estimate["total"] == sum(estimate[p] for p in parts) and estimate["tables"] > 0
        assert estimate["gemm_probe"] == 3 * 1024 * 1024 * 4  # three fp32 1024 x 1024 matrices
        # Rank 0 gathers every table, and (checkpoints on) their Adagrad state: 2 x sum(vocab) x d floats.
        rows = result["sharding"]["replicated_rows"] + sum(r["rows"] for r in result["sharding"]["ranks"])
        assert estimate["gathered"] == (2 * rows * cfg.model.embedding_dim * 4 if rank == 0 else 0)
        assert estimate["runtime"] < estimate["total"] and 0.5 < peak / estimate["total"] < 3
    # The MLPs: weights and gradients on every rank; Adam's two moments for the rank's share when split.
    widths = [13, *cfg.model.bottom_mlp], [top_input_size(26, cfg.model.embedding_dim), *cfg.model.top_mlp]
    mlp_floats = sum(i * o + o for w in widths for i, o in zip(w, w[1:]))
    mlps = [estimate["mlps"] for estimate in result["memory_estimate_bytes"]]
    if shared["used"]:
        assert sum(mlps) == (2 * 2 + 2) * mlp_floats * 4 and all(m > 2 * mlp_floats * 4 for m in mlps)
    else:
        assert mlps == [4 * mlp_floats * 4] * 2
    sharding = result["sharding"]
    assert sharding["shard_min_rows"] == 25 and [r["rank"] for r in sharding["ranks"]] == [0, 1]
    assert sorted(sharding["replicated_tables"] + [t for r in sharding["ranks"] for t in r["tables"]]) == list(range(26))
    loader = result["loader"]
    assert len(loader["per_rank"]) == 2 and all(r["batches"] == steps for r in loader["per_rank"])
    assert loader["samples_per_s"] > 0 and loader["ratio_to_training"] == pytest.approx(
        loader["samples_per_s"] / result["samples_per_s"])
    assert [set(p) for p in result["phase_seconds"]] == [{"data", "forward", "backward", "gradient_sync",
                                                          "optimizer"}] * 2
    assert result["ccl_environment"] is None  # gloo
    # The roofline's ceiling, sampled by both ranks every 5% of the steps and after the last.
    every = max(1, round(steps * train.GEMM_SAMPLE_EVERY))
    gemm = result["gemm_in_run"]
    assert gemm["samples"] == len({s for s in range(1, steps + 1) if s % every == 0} | {steps})
    assert gemm["precision"] == "fp32" and len(gemm["per_rank_mean_gflops"]) == 2
    assert gemm["machine_gflops"] == pytest.approx(sum(gemm["per_rank_mean_gflops"]))
    assert 0 < gemm["min_gflops"] <= min(gemm["per_rank_mean_gflops"]) <= max(gemm["per_rank_mean_gflops"]) <= gemm["max_gflops"]
    print(f"\ntiny training: {result['samples_per_s']:.0f} samples/s on 2 ranks, AUC {result['auc']:.4f}")


def test_training_evaluates_along_the_way(trained):
    result = trained["result"]
    curve = result["auc_curve"]
    assert [p["step"] for p in curve] == [8, 16, 24, 32]
    assert [p["samples"] for p in curve] == [p["step"] * 512 for p in curve]
    assert [p["rows"] for p in curve] == [1000, 1000, 1000, ROWS["test"]]  # the final one: the whole split
    assert (curve[-1]["auc"], curve[-1]["loss"]) == (result["auc"], result["logloss"])
    assert curve[0]["auc"] < curve[-1]["auc"]


def progress_lines(stdout: str) -> list[dict]:
    return [json.loads(line[len("PROGRESS "):]) for line in stdout.splitlines() if line.startswith("PROGRESS ")]


def test_training_reports_progress_lines(trained):
    lines = progress_lines(trained["stdout"])
    train_lines = [p for p in lines if p["stage"] == "train"]
    assert train_lines and {p["stage"] for p in lines} == {"train", "eval"}
    assert train_lines[-1]["step"] == train_lines[-1]["steps"] == trained["result"]["steps"]
    assert all(p["samples_per_s"] > 0 and p["loss"] > 0 for p in train_lines)
    evals = [p for p in lines if p["stage"] == "eval"]
    assert [(p["step"], p["rows"]) for p in evals] == [(p["step"], p["rows"]) for p in trained["result"]["auc_curve"]]
    # The fields the pipeline's progress bar reads are there too.
    assert all(p["steps"] == 32 and p["samples_per_s"] > 0 and 0 < p["auc"] < 1 and p["loss"] > 0 for p in evals)


def test_a_stopped_run_resumes_to_the_same_result(trained, tmp_path):
    """Run B: stopped after step 15 (its last checkpoint is step 10), then started again; train.resume
    makes the second start continue from the checkpoint. It must end exactly like run A."""
    overrides = [*ALONG_THE_WAY, "train.resume=true"]
    stopped = train_run(tmp_path, trained["data"], overrides, "--stop-after-steps", "15")
    assert stopped["result"] is None and "stopped after step 15" in stopped["stdout"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10
    resumed = train_run(tmp_path, trained["data"], overrides)
    a, b = trained["result"], resumed["result"]
    assert "resuming from" in resumed["stdout"] and b["resumed_from_step"] == 10
    assert b["steps"] == a["steps"] and b["test_rows"] == a["test_rows"]
    for key in ("auc", "logloss", "accuracy", "final_loss"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert [(p["step"], p["rows"]) for p in b["auc_curve"]] == [(p["step"], p["rows"]) for p in a["auc_curve"]]
    for p, q in zip(b["auc_curve"], a["auc_curve"]):
        assert (p["auc"], p["loss"]) == pytest.approx((q["auc"], q["loss"]), abs=1e-6)
    state_a = torch.load(trained["dir"] / "model.pt", weights_only=True)["state_dict"]
    state_b = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    for name, tensor in state_a.items():
        torch.testing.assert_close(state_b[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_bf16_learns_and_stops_at_the_target_auc(trained, tmp_path):
    run_b = train_run(tmp_path, trained["data"],
                      ["train.precision=bf16", "train.eval_every_steps=4", "train.eval_rows=1000",
                       "train.target_auc=0.8"])
    result = run_b["result"]
    assert result["precision"] == "bf16"
    assert result["gemm_in_run"]["precision"] == "bf16" and result["gemm_in_run"]["samples"] >= 1
    # bf16 still learns. The final loss is the last step's alone and the run stops early (after 16 steps
    # here, at 0.48; another draw of the initial weights stopped after 8, at 0.63): compared with the first step's (0.71).
    first_loss = next(p["loss"] for p in progress_lines(run_b["stdout"]) if p["stage"] == "train")
    assert result["auc"] > 0.75 and 0 < result["final_loss"] < first_loss - 0.03
    *periodic, final = result["auc_curve"]
    assert result["early_stopped"] is True and result["steps"] == periodic[-1]["step"] < 32
    assert periodic[-1]["auc"] >= 0.8 and all(p["auc"] < 0.8 for p in periodic[:-1])
    assert final["step"] == result["steps"] and final["rows"] == ROWS["test"]
    fp32 = trained["result"]
    print(f"\ntiny bf16: {result['samples_per_s']:.0f} samples/s (fp32 {fp32['samples_per_s']:.0f}), "
          f"AUC {result['auc']:.4f} after {result['steps']} steps (fp32 {fp32['auc']:.4f} after 32)")


def test_a_run_stopped_before_its_first_gemm_sample_still_samples_its_ceiling(trained, tmp_path):
    # Any AUC reaches a target of 0.01: the run stops after its first step, before the first sampling step (2).
    result = train_run(tmp_path, trained["data"], ["train.eval_every_steps=1", "train.eval_rows=1000",
                                                   "train.target_auc=0.01"])["result"]
    assert result["early_stopped"] is True and result["steps"] == 1
    assert result["gemm_in_run"]["samples"] == 1 and result["gemm_in_run"]["machine_gflops"] > 0


SGD_LR = 30  # (AUC 0.85 at 20-50 here; 0.60 at 5, 0.51 at Adagrad's 0.05)


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "sgd"])
def test_the_other_table_optimizers_train_and_checkpoint(trained, tmp_path, rule):
    """Row-wise Adagrad and SGD on the sharded tables (compiled where a compiler is): they learn, their
    state has its own size (one float per row, none) in the memory estimate and the checkpoint."""
    # SGD's steps do not grow for rare rows as Adagrad's do: it needs a far larger rate.
    rate = {"rowwise_adagrad": [], "sgd": [f"train.sparse_lr={SGD_LR}"]}[rule]
    run_b = train_run(tmp_path, trained["data"], [*ALONG_THE_WAY, f"train.sparse_optimizer={rule}", *rate])
    result, columns = run_b["result"], {"rowwise_adagrad": 1, "sgd": 0}[rule]
    print(f"\ntiny {rule}: AUC {result['auc']:.4f} (adagrad {trained['result']['auc']:.4f})")
    assert result["auc"] > 0.75
    vocab = json.loads((trained["data"] / "manifest.json").read_text())["vocab_sizes"]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["embedding_adagrad_sum"].shape == (sum(vocab), columns)
    if columns:
        assert (saved["embedding_adagrad_sum"] > 0).any()
    for estimate, adagrad in zip(result["memory_estimate_bytes"], trained["result"]["memory_estimate_bytes"]):
        rows = (adagrad["optimizer_state"] - estimate["optimizer_state"]) // (4 * (16 - columns))  # tiny: d = 16
        assert rows * (4 * (16 - columns)) == adagrad["optimizer_state"] - estimate["optimizer_state"] and rows > 0


def test_checkpoint_restores_the_model(trained):
    from dlrm.inference import load_model

    model = load_model(trained["dir"] / "model.pt")  # the whole model, the sharded tables gathered
    manifest = json.loads((trained["data"] / "manifest.json").read_text())
    assert model.embeddings.rows == manifest["vocab_sizes"]
    assert not list(trained["dir"].glob(".*.tmp"))  # no temporary files left behind


def infer(trained, ranks: int | None) -> dict:
    out = trained["dir"] / f"inference-{ranks}"
    run(["-m", "dlrm.inference", "--config", str(trained["dir"] / "config.json"), "--data", str(trained["data"]),
         "--checkpoint", str(trained["dir"] / "model.pt"), "--out", str(out)], ranks=ranks)
    return json.loads((out / "inference.json").read_text())


def test_inference_on_two_ranks(trained):
    result = infer(trained, ranks=2)
    # Each rank's shard has 1500 rows: 2 full batches of 512, timed twice each (max_batches is 4).
    assert result["ranks"] == 2 and result["batch_size"] == 512
    assert result["batches"] == 2 * 4 and result["rows"] == 2 * 4 * 512
    assert result["samples_per_s"] > 0 and len(result["per_rank_samples_per_s"]) == 2
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] and latency["mean"] > 0


def test_inference_without_a_launcher(trained):
    result = infer(trained, ranks=None)
    assert result["ranks"] == 1 and result["batches"] == 4  # 5 full batches in 3000 rows, capped at 4
    assert result["samples_per_s"] > 0
