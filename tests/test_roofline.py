"""The roofline: FLOP counts by hand, the fraction's arithmetic, and quick sanity runs of the probes."""

import json
import math

import pytest
import torch
from torch import nn

from bench.config import ModelConfig
from dlrm import roofline
from dlrm.model import DLRM, interaction_size
from dlrm.roofline import flops_per_sample, measure_gemm, measure_memory_bandwidth, roofline_fraction

TINY = ModelConfig(embedding_dim=2, bottom_mlp=[4, 2], top_mlp=[3, 1])
SMALL = ModelConfig(embedding_dim=64, bottom_mlp=[512, 256, 64], top_mlp=[512, 256, 1])


def test_tiny_config_by_hand():
    bottom = 2 * (13 * 4 + 4 * 2)  # 120
    top = 2 * ((2 + 351) * 3 + 3 * 1)  # input d + 27*26/2 = 353: 2124
    interaction = 2 * 27 * 27 * 2  # 2916
    assert bottom + top + interaction == 5160
    assert flops_per_sample(TINY, training=False) == 5160


def test_small_profile_by_hand():
    bottom = 2 * (13 * 512 + 512 * 256 + 256 * 64)  # 308_224
    top = 2 * (415 * 512 + 512 * 256 + 256 * 1)  # input 64 + 351 = 415: 687_616
    interaction = 2 * 27 * 27 * 64  # 93_312
    assert bottom + top + interaction == 1_089_152
    assert flops_per_sample(SMALL, training=False) == 1_089_152
    assert flops_per_sample(SMALL, training=True) == 3_267_456


@pytest.mark.parametrize("cfg", [TINY, SMALL])
def test_training_is_three_forwards(cfg):
    assert flops_per_sample(cfg, training=True) == 3 * flops_per_sample(cfg, training=False)


@pytest.mark.parametrize("cfg", [TINY, SMALL])
def test_mlp_count_matches_the_real_models_layers(cfg):
    # The MLP shapes come from the built model, so a wrong interaction width would show.
    # (torch.utils.flop_counter agrees too, but its first use imports torch._dynamo: seconds.)
    model = DLRM([5] * 26, cfg)
    linear = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    # The top MLP's zero padding columns (dlrm.model.top_input_size) are not the model's arithmetic.
    padding = 2 * (model.top[0].in_features - interaction_size(26, cfg.embedding_dim)) * model.top[0].out_features
    assert linear - padding + 2 * 27 * 27 * cfg.embedding_dim == flops_per_sample(cfg, training=False)


def test_roofline_fraction_arithmetic():
    # 10 GFLOP/s at 1e6 flops/sample is at most 10_000 samples/s; 1_000 is a tenth of it.
    assert roofline_fraction(1_000, 1e6, 10.0) == pytest.approx(0.1)
    assert roofline_fraction(10_000, 1e6, 10.0) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measure_gemm_is_positive_and_restores_threads(dtype):
    before = torch.get_num_threads()
    gflops = measure_gemm(threads=1 if before != 1 else 2, dtype=dtype, seconds=0.05, n=256)
    assert gflops > 0 and math.isfinite(gflops)
    assert torch.get_num_threads() == before


def test_thread_count_is_set_inside_and_restored_after_an_error():
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    with pytest.raises(RuntimeError), roofline.torch_threads(wanted):
        assert torch.get_num_threads() == wanted
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_measure_memory_bandwidth_is_positive():
    gb_per_s = measure_memory_bandwidth(threads=1, seconds=0.05, nbytes=1 << 20)
    assert gb_per_s > 0 and math.isfinite(gb_per_s)


@pytest.fixture
def fake_probes(monkeypatch):
    """Deterministic probes that record the threads they were given."""
    calls = []

    def gemm(threads, dtype, seconds=1.0, n=1024):
        calls.append(("gemm", threads))
        return {torch.float32: 50.0, torch.bfloat16: 120.0}[dtype]

    def memory(threads, seconds=0.5, nbytes=256 << 20):
        calls.append(("memory", threads))
        return 20.0

    monkeypatch.setattr(roofline, "measure_gemm", gemm)
    monkeypatch.setattr(roofline, "measure_memory_bandwidth", memory)
    return calls


def test_measure_machine_per_rank_and_total(fake_probes):
    machine = roofline.measure_machine(threads_per_rank=1, ranks=2)
    assert machine["gemm_gflops"] == {"fp32": 50.0, "bf16": 120.0}
    assert machine["machine_gemm_gflops"] == {"fp32": 100.0, "bf16": 240.0}
    assert machine["memory_gb_per_s"] == 20.0
    assert isinstance(machine["bf16_native"], bool)
    assert (machine["threads_per_rank"], machine["ranks"]) == (1, 2)
    # GEMM with one rank's threads; the shared memory bandwidth with every rank's.
    assert fake_probes == [("gemm", 1), ("gemm", 1), ("memory", 2)]


def test_cli_prints_the_dict_as_json(fake_probes, capsys):
    assert roofline.main(["--threads", "1", "--ranks", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["machine_gemm_gflops"]["fp32"] == 100.0 and printed["ranks"] == 2


def test_later_gemm_readings_raise_the_ceiling_and_are_kept():
    measured = {"gemm_gflops": {"fp32": 166.0, "bf16": 1300.0}, "machine_gemm_gflops": {"fp32": 332.0, "bf16": 2600.0},
                "ranks": 2}
    roofline.add_gemm_readings(measured, {"fp32": 183.0})
    assert measured["gemm_gflops"] == {"fp32": 183.0, "bf16": 1300.0}
    assert measured["machine_gemm_gflops"] == {"fp32": 366.0, "bf16": 2600.0}
    roofline.add_gemm_readings(measured, {"fp32": 170.0, "bf16": 1200.0})  # lower readings change nothing
    assert measured["gemm_gflops"] == {"fp32": 183.0, "bf16": 1300.0}
    assert measured["gemm_gflops_readings"] == {"fp32": [166.0, 183.0, 170.0], "bf16": [1300.0, 1200.0]}


def test_a_gemm_probe_samples_one_window_and_keeps_every_reading():
    probe = roofline.GemmProbe(torch.float32, n=64)
    first, second = probe.sample(0.01), probe.sample(0.01)
    assert probe.readings == [first, second] and all(g > 0 and math.isfinite(g) for g in probe.readings)
    assert torch.allclose(probe.c, probe.a @ probe.b)  # the product it times is the real one
    assert probe.flops == 2 * 64**3


def test_a_window_makes_at_least_one_call():
    calls = []
    rate = roofline.window_rate(lambda: calls.append(1), work_per_call=10.0, seconds=0.0)
    assert calls == [1] and rate > 0


def test_in_run_ceiling_is_the_sum_of_the_ranks_means():
    gemm = roofline.in_run_gemm([[160.0, 200.0, 180.0], [170.0, 170.0, 170.0]], 0.1, "fp32")
    assert gemm["machine_gflops"] == pytest.approx(180.0 + 170.0)
    assert gemm["per_rank_mean_gflops"] == pytest.approx([180.0, 170.0])
    assert (gemm["min_gflops"], gemm["max_gflops"], gemm["samples"]) == (160.0, 200.0, 3)
    assert (gemm["precision"], gemm["seconds_per_sample"]) == ("fp32", 0.1)
    assert roofline.in_run_gemm([[170.0], []], 0.1, "fp32") is None  # a rank without samples: no ceiling
