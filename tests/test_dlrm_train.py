"""Training options without launching ranks: the MLPerf learning-rate schedule, precision, settings."""

import sys

import pytest
import torch

from bench.config import ConfigError, resolve
from dlrm import train
from dlrm.train import lr_scale


class ReferenceLRPolicyScheduler(torch.optim.lr_scheduler.LRScheduler):
    """LRPolicyScheduler from the reference dlrm_s_pytorch.py (MLPerf DLRM), as published."""

    def __init__(self, optimizer, num_warmup_steps, decay_start_step, num_decay_steps):
        self.num_warmup_steps = num_warmup_steps
        self.decay_start_step = decay_start_step
        self.decay_end_step = decay_start_step + num_decay_steps
        self.num_decay_steps = num_decay_steps
        if self.decay_start_step < self.num_warmup_steps:
            sys.exit("Learning rate warmup must finish before the decay starts")
        super().__init__(optimizer)

    def get_lr(self):
        step_count = self._step_count
        if step_count < self.num_warmup_steps:
            scale = 1.0 - (self.num_warmup_steps - step_count) / self.num_warmup_steps
            lr = [base_lr * scale for base_lr in self.base_lrs]
            self.last_lr = lr
        elif self.decay_start_step <= step_count and step_count < self.decay_end_step:
            decayed_steps = step_count - self.decay_start_step
            scale = ((self.num_decay_steps - decayed_steps) / self.num_decay_steps) ** 2
            min_lr = 0.0000001
            lr = [max(min_lr, base_lr * scale) for base_lr in self.base_lrs]
            self.last_lr = lr
        else:
            if self.num_decay_steps > 0:
                lr = self.last_lr
            else:
                lr = self.base_lrs
        return lr


def reference_rates(steps: int, warmup: int, decay_start: int, decay_steps: int) -> list[float]:
    """The reference's rate (base 1) at optimizer steps 1..steps."""
    weight = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([weight], lr=1.0)
    scheduler = ReferenceLRPolicyScheduler(opt, warmup, decay_start, decay_steps)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("step, expected", [
    (1, 0.25), (2, 0.5), (3, 0.75),  # warm-up: step / warmup_steps
    (4, 1.0), (9, 1.0),  # constant
    (10, 1.0), (11, 0.64), (12, 0.36), (14, 0.04),  # ((5 - (step - 10)) / 5) ** 2
    (15, 0.0), (100, 0.0),  # decayed to 0, and stays there
])
def test_schedule_values(step, expected):
    assert lr_scale(step, warmup_steps=4, decay_start_step=10, decay_steps=5) == pytest.approx(expected)


def test_schedule_with_the_mlperf_settings():
    mlperf = {"warmup_steps": 8000, "decay_start_step": 48000, "decay_steps": 27000}
    assert lr_scale(1, **mlperf) == pytest.approx(1 / 8000)
    assert lr_scale(4000, **mlperf) == pytest.approx(0.5)
    assert lr_scale(8000, **mlperf) == lr_scale(48000, **mlperf) == 1.0
    assert lr_scale(48000 + 13500, **mlperf) == pytest.approx(0.25)
    assert lr_scale(75000, **mlperf) == 0.0


def test_schedule_off_is_constant():
    assert {lr_scale(s, 0, 0, 0) for s in (1, 2, 1000, 10**6)} == {1.0}
    assert [lr_scale(s, 3, 0, 0) for s in (1, 2, 3, 50)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_schedule_matches_the_reference_scheduler_in_warmup_and_decay():
    warmup, decay_start, decay_steps = 6, 10, 8
    reference = reference_rates(20, warmup, decay_start, decay_steps)
    for step in [*range(1, warmup), *range(decay_start, decay_start + decay_steps)]:
        assert lr_scale(step, warmup, decay_start, decay_steps) == pytest.approx(reference[step - 1]), step
    # Where they differ on purpose: the reference holds (W-1)/W until the decay, we hold 1.
    assert reference[warmup - 1] == pytest.approx((warmup - 1) / warmup)
    assert lr_scale(warmup, warmup, decay_start, decay_steps) == 1.0


def test_auto_precision_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(train.roofline, "bf16_native", lambda: True)
    assert train.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(train.roofline, "bf16_native", lambda: False)
    assert train.resolve_precision("auto") == "fp32"
    assert train.resolve_precision("bf16") == "bf16" and train.resolve_precision("fp32") == "fp32"


def test_bf16_autocast_keeps_parameters_and_gradients_fp32():
    layer = torch.nn.Linear(4, 1)
    with train.autocast("bf16"):
        out = layer(torch.rand(3, 4))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.dtype == layer.weight.grad.dtype == torch.float32
    with train.autocast("fp32"):
        assert layer(torch.rand(3, 4)).dtype == torch.float32


def test_training_settings_are_validated():
    cfg = resolve("tiny", ["train.precision=bf16", "train.eval_rows=100", "train.target_auc=0.8",
                           "train.warmup_steps=5", "train.decay_start_step=5", "train.decay_steps=10"])
    assert cfg.train.precision == "bf16" and cfg.train.eval_rows == 100 and cfg.train.target_auc == 0.8
    for bad in ["train.precision=fp16", "train.eval_rows=0", "train.target_auc=1.5", "train.checkpoint_every_steps=-1"]:
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            resolve("tiny", [bad])
    with pytest.raises(ConfigError, match="decay_start_step .* must not come before"):
        resolve("tiny", ["train.warmup_steps=10", "train.decay_start_step=5", "train.decay_steps=10"])
    resolve("tiny", ["train.warmup_steps=10", "train.decay_start_step=5"])  # no decay: no constraint


def test_full_profile_has_the_mlperf_settings():
    cfg = resolve("full")
    assert cfg.model.embedding_dim == 128
    assert cfg.model.bottom_mlp == [512, 256, 128] and cfg.model.top_mlp == [1024, 1024, 512, 256, 1]
    assert cfg.train.batch_size == 65536 and cfg.train.target_auc == 0.8025
    assert (cfg.train.warmup_steps, cfg.train.decay_start_step, cfg.train.decay_steps) == (8000, 48000, 27000)
    assert cfg.data.source == "criteo" and cfg.data.days == 23
    assert cfg.preprocess.max_ind_range == 40_000_000
    assert resolve("tiny").preprocess.max_ind_range == resolve("small").preprocess.max_ind_range == 0


def test_loaded_adam_moments_take_their_parameters_layout():
    """A checkpoint from before the first layer was column-major holds its moments row-major."""
    weight = torch.nn.Parameter(torch.randn(3, 5).T)  # [5, 3], column-major
    weight.grad = torch.randn(3, 5).T
    saved = torch.optim.Adam([weight], fused=True)
    saved.step()
    state = saved.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):
        state["state"][0][key] = state["state"][0][key].contiguous()  # as the older code saved them
    loaded = torch.optim.Adam([weight], fused=True)
    loaded.load_state_dict(state)
    train.state_in_parameter_layout(loaded)
    for key in ("exp_avg", "exp_avg_sq"):
        assert loaded.state[weight][key].stride() == weight.stride() == (1, 5)
        torch.testing.assert_close(loaded.state[weight][key], saved.state[weight][key], rtol=0, atol=0)
