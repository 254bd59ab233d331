"""dlrm.inference: the batch-size sweep, the precision variants and their accuracy, the roofline fraction.

A tiny-profile DLRM is trained in-process for a second on learnable data (the labels follow
the column-0 id's parity), saved as dlrm.train saves it, then benchmarked alone without a
launcher and on 2 mpiexec ranks.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from bench.config import ConfigError, resolve
from dlrm import data, dist, inference, interaction_kernel, roofline, runner, train
from dlrm.inference import (Autocast, InductorDLRM, build_variant, compile_first, load_model, prepare,
                            timing_inputs)
from preprocess.layout import ProcessedData
from tests.test_dlrm_data import VOCAB, write_processed
from tests.test_dlrm_end_to_end import run

ROWS = {"train": 8192, "test": 10, "val": 3000}
TRAIN_BATCH = 256
# TorchInductor compiles its kernels with the C++ compiler it finds (g++ by default on Linux);
# without one dlrm.inference runs the variants eagerly.
CAN_COMPILE = shutil.which("g++") is not None
# The eager model's interaction kernel is compiled with cc or gcc (dlrm.interaction_kernel).
HAS_CC = (shutil.which("cc") or shutil.which("gcc")) is not None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """A trained tiny model's checkpoint, its data, and its run folder with config.json."""
    root = tmp_path_factory.mktemp("inference")
    processed = write_processed(root / "processed", ROWS)
    cfg = resolve("tiny")
    torch.sparse.check_sparse_tensor_invariants.disable()  # the default, made explicit (as dlrm.train does)
    model, optimizers, _ = train.build_model(VOCAB, cfg)
    loss_fn = nn.BCEWithLogitsLoss()
    for dense, ids, labels in data.train_batches(ProcessedData(processed, "train"), TRAIN_BATCH, 0, 1):
        loss = loss_fn(model(dense, ids), labels)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    run_dir = root / "run"
    runner.save_atomically({"state_dict": model.state_dict(), "vocab_sizes": VOCAB,
                            "model_config": cfg.model.model_dump(mode="json")}, run_dir / "model.pt")
    return {"dir": run_dir, "data": processed, "model": run_dir / "model.pt"}


def infer(checkpoint: dict, name: str, overrides: list[str], ranks: int | None) -> dict:
    """inference.json of dlrm.inference run on the checkpoint with the tiny profile and ``overrides``."""
    out = checkpoint["dir"] / name
    out.mkdir()
    config = out / "config.json"
    config.write_text(json.dumps(resolve("tiny", overrides).to_json()))
    run(["-m", "dlrm.inference", "--config", str(config), "--data", str(checkpoint["data"]),
         "--checkpoint", str(checkpoint["model"]), "--out", str(out)], ranks=ranks)
    return json.loads((out / "inference.json").read_text())


def val_reference(checkpoint: dict) -> dict:
    """AUC and log loss of the fp32 model on every val row, straight from sklearn."""
    val = ProcessedData(checkpoint["data"], "val")
    dense, ids, labels = data.read_batch(val, (0, len(val)))
    with torch.inference_mode():
        probs = torch.sigmoid(load_model(checkpoint["model"])(dense, ids)).numpy()
    return {"auc": roc_auc_score(labels.numpy(), probs),
            "logloss": log_loss(labels.numpy(), probs.astype(np.float64), labels=[0, 1])}


def check_sweep(result: dict, sizes: list[int]) -> None:
    """One point per batch size with positive throughput, ordered latencies, and the top level's point."""
    assert [p["batch_size"] for p in result["sweep"]] == sizes
    for point in result["sweep"]:
        latency = point["latency_ms"]
        assert point["samples_per_s"] > 0 and 0 < latency["p50"] <= latency["p99"] and latency["mean"] > 0
        assert point["rows"] == point["batches"] * point["batch_size"]
        assert len(point["per_rank_samples_per_s"]) == result["ranks"]
    configured = next(p for p in result["sweep"] if p["batch_size"] == result["batch_size"])
    # The top level is that point, but for the roofline's ceiling and fraction, which are the best point's.
    roofline_keys = ("gemm_gflops", "roofline_fraction")
    assert all(result[key] == value for key, value in configured.items() if key not in roofline_keys)
    best = max(result["sweep"], key=lambda p: p["samples_per_s"])
    assert result["best"] == {"batch_size": best["batch_size"], "samples_per_s": best["samples_per_s"]}
    # Each point's ceiling is the GEMM rate its ranks sampled around it (summed over the ranks).
    flops = result["flops_per_sample"]
    for point in result["sweep"]:
        assert 1.0 < point["gemm_gflops"] / result["ranks"] < 100_000
        assert point["roofline_fraction"] == pytest.approx(point["samples_per_s"] / (point["gemm_gflops"] * 1e9 / flops))
    assert [result[key] for key in roofline_keys] == [best[key] for key in roofline_keys]


def check_variants(result: dict, names: list[str], reference: dict, compile: bool) -> None:
    """fp32 scores are sklearn's on all val rows of the eager model; no variant loses more than
    0.01 AUC; with ``compile`` (inference.compile) every variant ran compiled where a C++ compiler
    is found, without it none did."""
    variants = result["variants"]
    assert list(variants) == names and result["val_rows"] == ROWS["val"]
    fp32 = variants["fp32"]
    assert fp32["auc"] > 0.75  # learnable data (Bayes AUC ~0.85): the comparison below means something
    # The compiled forward and the interaction kernel sum in another order than the reference's
    # PyTorch model (logits within ~1e-6): at most a near-tie pair or two
    # may swap, 1 / (positives * negatives) ~ 5e-7 each; a row scored twice or not at all moves more.
    assert fp32["auc"] == pytest.approx(reference["auc"], abs=1e-6)
    assert fp32["logloss"] == pytest.approx(reference["logloss"], rel=1e-6)
    assert fp32["samples_per_s"] == result["samples_per_s"] and fp32["latency_ms"] == result["latency_ms"]
    for name, variant in variants.items():
        assert abs(variant["auc"] - fp32["auc"]) < 0.01, name
        assert abs(variant["logloss"] - fp32["logloss"]) < 0.01, name
        assert variant["samples_per_s"] > 0 and variant["batches"] >= 1, name
        if compile:
            assert variant["compiled"]["used"] is CAN_COMPILE, (name, variant["compiled"])
        else:
            assert variant["compiled"] == {"used": False, "reason": "inference.compile is false"}, name
    assert result["compile"] == fp32["compiled"]
    if compile and CAN_COMPILE:
        for name in ("interaction_kernel", "mlp_kernel"):
            assert result[name] == {"used": False, "reason": "the variants ran compiled: TorchInductor fuses the model's loops"}
    else:
        assert result["interaction_kernel"]["used"] is HAS_CC, result["interaction_kernel"]
        assert result["mlp_kernel"]["used"] is HAS_CC, result["mlp_kernel"]


# --- pieces, in-process -----------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CC, reason="the interaction kernel needs a C compiler")
@pytest.mark.parametrize("name", ["fp32", "bf16", "int8"])
def test_the_eager_variants_with_the_interaction_kernel_give_pytorchs_logits(checkpoint, name):
    kernel, status = interaction_kernel.load()
    assert kernel is not None, status
    reference = build_variant(load_model(checkpoint["model"]), name, use_ipex=False)
    fused = build_variant(load_model(checkpoint["model"], kernel), name, use_ipex=False)
    dense, ids = timing_inputs(ProcessedData(checkpoint["data"], "val"), (0, 3000), rows=700)
    with torch.inference_mode():
        expected, got = reference(dense, ids), fused(dense, ids)
    assert got.shape == (700,) and got.dtype == torch.float32
    # fp32: the same products summed in another order. bf16: PyTorch's interaction runs in bf16, the
    # kernel's in fp32, so a logit may move by a bf16 step (2^-6 at 2-4); int8 then requantizes.
    tolerance = 1e-4 if name == "fp32" else 2e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_int8_quantizes_the_linear_layers_and_shares_the_tables(checkpoint):
    model = load_model(checkpoint["model"])
    int8 = build_variant(model, "int8", use_ipex=False)
    quantized = [m for m in int8.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == 4 and not [m for m in int8.modules() if type(m) is nn.Linear]
    assert all(m.weight().dtype == torch.qint8 for m in quantized)
    # The tables are shared, not copied; the fp32 model is left as it was.
    assert all(q is w for q, w in zip(int8.embedding_parameters(), model.embedding_parameters()))
    assert len([m for m in model.modules() if type(m) is nn.Linear]) == 4


def test_bf16_gives_float32_probabilities_close_to_fp32(checkpoint):
    model = load_model(checkpoint["model"])
    bf16 = build_variant(model, "bf16", use_ipex=False)
    assert isinstance(bf16, Autocast)
    dense, ids, _ = data.read_batch(ProcessedData(checkpoint["data"], "val"), (0, 256))
    with torch.inference_mode():
        logits = bf16(dense, ids)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(torch.sigmoid(logits), torch.sigmoid(model(dense, ids)), atol=0.02, rtol=0)


def test_the_inductor_forward_is_the_models_forward(checkpoint):
    model = load_model(checkpoint["model"])
    dense, ids, _ = data.read_batch(ProcessedData(checkpoint["data"], "val"), (0, 64))
    with torch.inference_mode():
        # Run eagerly here (it is only ever compiled in dlrm.inference): the same logits, pair for pair.
        torch.testing.assert_close(InductorDLRM(model)(dense, ids), model(dense, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CAN_COMPILE, reason="TorchInductor needs a C++ compiler")
@pytest.mark.parametrize("name", ["fp32", "bf16", "int8"])
def test_compiled_variants_give_the_eager_variants_logits(checkpoint, name):
    model = load_model(checkpoint["model"])
    inputs = timing_inputs(ProcessedData(checkpoint["data"], "val"), (0, ROWS["val"]), rows=600)
    compiled = build_variant(model, name, use_ipex=False, inductor=True)
    assert compile_first(compiled, inputs) == (True, f"TorchInductor, torch {torch.__version__}")
    eager = build_variant(model, name, use_ipex=False)
    with torch.inference_mode():
        for rows in (1, 3, 600):  # batch 1 has its own graph; 3 and 600 share the symbolic-batch one
            # bf16 only rounds the MLPs (the compiled interaction stays fp32), int8 requantizes per batch.
            tolerance = 1e-4 if name == "fp32" else 0.05
            torch.testing.assert_close(compiled(inputs[0][:rows], inputs[1][:rows]),
                                       eager(inputs[0][:rows], inputs[1][:rows]), atol=tolerance, rtol=0)


def test_a_variant_that_does_not_compile_runs_eagerly_and_says_why(checkpoint, monkeypatch):
    def no_compiler(module, **options):
        def fails(*args):
            raise RuntimeError("Compiler: g++ is not found\nsecond line")
        return fails
    monkeypatch.setattr(torch, "compile", no_compiler)
    model = load_model(checkpoint["model"])
    inputs = timing_inputs(ProcessedData(checkpoint["data"], "val"), (0, ROWS["val"]), rows=4)
    rank = runner.Rank(dist.RankInfo(rank=0, world_size=1, local_rank=0, local_size=1), "gloo", {})
    variant, compiled = prepare(rank, model, "fp32", inputs, use_ipex=False, inductor=True)
    assert variant is model
    assert compiled == {"used": False, "reason": "torch.compile failed: RuntimeError: Compiler: g++ is not found"}
    monkeypatch.setattr(inference, "ipex_optimize", lambda module, dtype: module)  # IPEX is not installed here
    variant, compiled = prepare(rank, model, "fp32", inputs, use_ipex=True, inductor=True)
    assert variant is model and compiled == {"used": False, "reason": "IPEX is used instead"}


def test_timing_inputs_are_the_shard_rows_in_the_loader_layout(tmp_path):
    val = ProcessedData(write_processed(tmp_path, {"val": 50}, tag_rows=True), "val")
    dense, ids = timing_inputs(val, (20, 50), rows=25)
    assert dense[:, 0].long().tolist() == list(range(20, 45))
    assert torch.equal(ids, data.read_batch(val, (20, 45)).ids)
    assert ids.T.is_contiguous()  # each table's ids contiguous, as the model reads them
    assert len(timing_inputs(val, (40, 50), rows=25)[0]) == 10  # never past the shard


@pytest.mark.parametrize("overrides, message", [
    (["inference.variants=[bf16,int8]"], "must include fp32"),
    (["inference.variants=[fp32,fp32]"], "must not repeat"),
    (["inference.variants=[fp32,fp16]"], "inference.variants.1='fp16'"),
    (["inference.sweep_batch_sizes=[0]"], "inference.sweep_batch_sizes.0=0"),
    (["inference.seconds_per_point=0"], "inference.seconds_per_point=0"),
])
def test_bad_inference_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        resolve("tiny", overrides)


# --- the entry point --------------------------------------------------------------------------------

@pytest.mark.integration
def test_alone_without_a_launcher_sweeps_scores_and_places_on_the_roofline(checkpoint):
    names = ["fp32", "bf16", "int8"]
    # A budget no point reaches, even on a busy machine: max_batches bounds every point.
    result = infer(checkpoint, "alone", [f"inference.variants=[{','.join(names)}]", "inference.max_batches=8",
                                         "inference.seconds_per_point=600", "inference.compile=true"],
                   ranks=None)
    assert result["ranks"] == 1 and result["batch_size"] == 512
    check_sweep(result, [1, 64, 512])
    # 3000 rows hold 5 full batches of 512: that point goes round them to time max_batches.
    assert [p["batches"] for p in result["sweep"]] == [8, 8, 8]
    check_variants(result, names, val_reference(checkpoint), compile=True)

    assert result["flops_per_sample"] == roofline.flops_per_sample(resolve("tiny").model, training=False)


@pytest.mark.integration
def test_two_ranks_add_up_and_score_every_val_row(checkpoint):
    # A budget shorter than any batch: every rank times exactly one batch per point.
    result = infer(checkpoint, "two-ranks", ["inference.ranks=2", "inference.seconds_per_point=1e-9",
                                             "inference.sweep_batch_sizes=[1,64,1024]"], ranks=2)
    assert result["ranks"] == 2 and len(result["per_rank_samples_per_s"]) == 2
    check_sweep(result, [1, 64, 512, 1024])  # the configured batch size is always a point
    assert [p["batches"] for p in result["sweep"]] == [2, 2, 2, 2]
    assert result["samples_per_s"] == pytest.approx(sum(result["per_rank_samples_per_s"]))
    check_variants(result, ["fp32", "int8"], val_reference(checkpoint), compile=False)  # the tiny profile's
