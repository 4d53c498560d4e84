"""Single-process strategy behaviour on a toy module: optimizer step, clipping, fp16 scaler, state."""

from __future__ import annotations

import math

import pytest
import torch
from strategy_driver import consumed_grad_norm
from torch import nn

from trainer.config import TrainConfig
from trainer.distributed import init_distributed
from trainer.strategies.base import build_strategy


def _toy(cfg: TrainConfig):
    torch.manual_seed(0)
    s = build_strategy(cfg, init_distributed())
    s.setup(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1)))
    return s


def _step(s, x, clip=1.0):
    with s.autocast():
        loss = s.forward(x).float().pow(2).mean()
    s.backward(loss)
    norm = s.clip_grad_norm(clip)
    if math.isfinite(norm):
        s.optimizer_step()
    else:
        s.skip_step()
    s.zero_grad()
    return float(loss.detach()), norm


def test_single_steps_change_params_and_clip_reports_prenorm():
    cfg = TrainConfig()
    cfg.run.precision = "fp32"
    s = _toy(cfg)
    before = [p.detach().clone() for p in s.local_params()]
    x = torch.randn(16, 4) * 100
    _, norm = _step(s, x, clip=1e-3)
    assert norm > 1e-3  # the norm BEFORE clipping is reported
    assert any(not torch.equal(a, b) for a, b in zip(before, s.local_params()))


@pytest.mark.parametrize("strategy,precision", [("single", "fp32"), ("single", "bf16"), ("single", "fp16"),
                                                ("ddp", "fp32")])
def test_clip_bounds_the_gradient_the_optimizer_consumes(strategy, precision):
    """The gradient AdamW takes in (read back from its first moment) has norm exactly `clip` when the
    pre-clip norm is larger, and the full pre-clip norm when the clip is loose. (The weights alone
    cannot show it: Adam's first step moves each weight by about lr whatever the gradient's scale.)
    fsdp and deepspeed: the same check on 2 processes in test_strategies_dist.py."""
    cfg = TrainConfig()
    cfg.parallel.strategy = strategy
    cfg.run.precision = precision
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))  # small: fp16 at scale 2**16 stays finite
    loose = _toy(cfg)
    _, prenorm = _step(loose, x, clip=1e9)
    assert consumed_grad_norm(loose) == pytest.approx(prenorm, rel=1e-5)
    clip = prenorm / 7
    tight = _toy(cfg)
    _, norm = _step(tight, x, clip=clip)
    assert norm == pytest.approx(prenorm, rel=1e-6)  # the norm BEFORE clipping is reported
    assert consumed_grad_norm(tight) == pytest.approx(clip, rel=1e-5)


def test_fp16_scaler_backs_off_on_overflow_and_skips_update():
    cfg = TrainConfig()
    cfg.run.precision = "fp16"
    s = _toy(cfg)
    scale0 = s.scaler.get_scale()
    before = [p.detach().clone() for p in s.local_params()]
    _, norm = _step(s, torch.full((4, 4), 1e4))
    assert not math.isfinite(norm)
    assert s.scaler.get_scale() < scale0
    assert all(torch.equal(a, b) for a, b in zip(before, s.local_params()))


def test_save_load_roundtrip_and_full_state_with_replacement(tmp_path):
    cfg = TrainConfig()
    cfg.run.precision = "bf16"
    s = _toy(cfg)
    _step(s, torch.randn(8, 4))
    s.save(tmp_path)
    t = _toy(cfg)
    t.load(tmp_path)
    for a, b in zip(s.local_params(), t.local_params()):
        assert torch.equal(a, b)
    assert t.optimizer.state_dict()["state"][0]["exp_avg"].equal(s.optimizer.state_dict()["state"][0]["exp_avg"])
    zeros = [torch.zeros_like(p) for p in s.local_params()]
    full = s.gather_full_state(zeros)
    assert set(full) == set(s.unwrapped_model().state_dict())
    assert all(v.abs().sum() == 0 for v in full.values())
    assert s.all_reduce_max(3.0) == 3.0 and s.all_reduce_mean(2.0) == 2.0
