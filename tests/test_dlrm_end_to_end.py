"""The real thing: ranks started by the venv's mpiexec, talking over gloo.

  * the one-collective sparse gradient all-reduce equals the dense average;
  * dlrm.train on 2 ranks learns a learnable dataset and accounts for every row;
  * dlrm.inference runs on 2 ranks, and alone without any launcher.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.config import resolve
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


# --- the sparse all-reduce, checked against the dense average ---------------------------------------

TABLE_ROWS = [5, 1, 9]


def rank_grads(rank: int) -> list[torch.Tensor]:
    """Uncoalesced sparse gradients like EmbeddingBag's (repeated rows); table 1 untouched on rank 1."""
    g = torch.Generator().manual_seed(rank)
    grads = []
    for t, rows in enumerate(TABLE_ROWS):
        n = 0 if (t == 1 and rank == 1) else 6
        indices = torch.randint(0, rows, (1, n), generator=g)
        grads.append(torch.sparse_coo_tensor(indices, torch.randn(n, 3, generator=g), (rows, 3)))
    return grads


def sparse_allreduce_worker(out: str) -> None:
    """Run on every rank: reduce, compare with the average of both ranks' dense gradients."""
    from dlrm import dist

    info = dist.launcher_env()
    dist.init(info, "gloo")
    weights = [torch.zeros(rows, 3, requires_grad=True) for rows in TABLE_ROWS]
    for weight, grad in zip(weights, rank_grads(info.rank)):
        weight.grad = grad
    dist.allreduce_sparse_grads(weights)
    for t, weight in enumerate(weights):
        expected = sum(rank_grads(r)[t].to_dense() for r in range(info.world_size)) / info.world_size
        assert weight.grad.is_sparse and weight.grad.shape == (TABLE_ROWS[t], 3)
        torch.testing.assert_close(weight.grad.to_dense(), expected)
    torch.distributed.barrier()
    Path(out, f"rank{info.rank}.ok").touch()
    dist.finish()


def test_sparse_allreduce_averages_all_tables_in_one_go(tmp_path):
    code = f"from tests.test_dlrm_end_to_end import sparse_allreduce_worker; sparse_allreduce_worker({str(tmp_path)!r})"
    run(["-c", code], ranks=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


# --- training and inference -------------------------------------------------------------------------

ROWS = {"train": 16384, "test": 3001, "val": 3000}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    processed = write_processed(root / "processed", ROWS)
    cfg = resolve("tiny", ["inference.ranks=2", "inference.warmup_batches=1", "inference.max_batches=4"])
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(cfg.to_json()))
    proc = run(["-m", "dlrm.train", "--config", str(run_dir / "config.json"), "--data", str(processed),
                "--out", str(run_dir)], ranks=2)
    return {"dir": run_dir, "data": processed, "cfg": cfg, "stdout": proc.stdout,
            "result": json.loads((run_dir / "train.json").read_text())}


def test_training_learns_and_counts_every_row(trained):
    result, cfg = trained["result"], trained["cfg"]
    steps = ROWS["train"] // cfg.train.batch_size
    assert result["world_size"] == 2 and len(result["pinning"]) == 2
    assert result["steps"] == steps and result["samples"] == steps * cfg.train.batch_size
    assert result["test_rows"] == ROWS["test"]
    assert result["auc"] > 0.75  # the labels follow the column-0 id's parity (Bayes AUC ~0.85)
    assert 0 < result["final_loss"] < 0.6 and 0 < result["logloss"] < 0.6
    assert result["samples_per_s"] > 0 and result["seconds"] > 0 and result["eval_seconds"] > 0
    assert result["backend"] == "gloo" and result["ipex"]["used"] is False
    assert result["threads_per_rank"] >= 1
    print(f"\ntiny training: {result['samples_per_s']:.0f} samples/s on 2 ranks, AUC {result['auc']:.4f}")


def test_training_reports_progress_lines(trained):
    lines = [json.loads(line[len("PROGRESS "):]) for line in trained["stdout"].splitlines()
             if line.startswith("PROGRESS ")]
    assert lines and {p["stage"] for p in lines} == {"train"}
    assert lines[-1]["step"] == lines[-1]["steps"] == trained["result"]["steps"]
    assert all(p["samples_per_s"] > 0 and p["loss"] > 0 for p in lines)


def test_checkpoint_restores_the_model(trained):
    from dlrm.inference import load_model

    model = load_model(trained["dir"] / "model.pt")
    manifest = json.loads((trained["data"] / "manifest.json").read_text())
    assert [e.num_embeddings for e in model.embeddings] == manifest["vocab_sizes"]
    assert not list(trained["dir"].glob(".*.tmp"))  # no temporary files left behind


def infer(trained, ranks: int | None) -> dict:
    out = trained["dir"] / f"inference-{ranks}"
    run(["-m", "dlrm.inference", "--config", str(trained["dir"] / "config.json"), "--data", str(trained["data"]),
         "--checkpoint", str(trained["dir"] / "model.pt"), "--out", str(out)], ranks=ranks)
    return json.loads((out / "inference.json").read_text())


def test_inference_on_two_ranks(trained):
    result = infer(trained, ranks=2)
    # Each rank's shard has 1500 rows: 2 full batches of 512 (max_batches is 4).
    assert result["ranks"] == 2 and result["batch_size"] == 512
    assert result["batches"] == 4 and result["rows"] == 4 * 512
    assert result["samples_per_s"] > 0 and len(result["per_rank_samples_per_s"]) == 2
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] and latency["mean"] > 0


def test_inference_without_a_launcher(trained):
    result = infer(trained, ranks=None)
    assert result["ranks"] == 1 and result["batches"] == 4  # 5 full batches in 3000 rows, capped at 4
    assert result["samples_per_s"] > 0
