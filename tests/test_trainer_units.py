"""Pure pieces of the trainer: LR schedule, EMA against a hand computation, log-SNR bands, RNG state."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from trainer.checkpoint import rng_state, set_rng_state
from trainer.ema import EMA
from trainer.lr import lr_at
from trainer.metrics import (
    BandAccumulator,
    band_edges,
    band_index,
    band_labels,
    band_training_weights,
    format_eta,
    progress_line,
)


def test_lr_warmup_then_constant():
    kw = dict(base_lr=1e-3, warmup_steps=4, total_steps=100, schedule="constant")
    assert [lr_at(s, **kw) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_lr_cosine_hits_floor_at_end_and_half_in_middle():
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(10, 120))


def test_lr_rejects_bad_schedule():
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, base_lr=1.0, warmup_steps=0, total_steps=10, schedule="linear")


def test_ema_matches_hand_computation():
    p = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    ema = EMA(p, decay=0.9)
    values = [[torch.tensor([3.0, 4.0]), torch.tensor([[10.0]])], [torch.tensor([5.0, 0.0]), torch.tensor([[-10.0]])]]
    for v in values:
        ema.update(v)
    # step 1: 0.9*1+0.1*3=1.2, 0.9*2+0.1*4=2.2, 1.0 ; step 2: 0.9*1.2+0.1*5=1.58, 0.9*2.2=1.98, 0.9-1=-0.1
    assert torch.allclose(ema.shadow[0], torch.tensor([1.58, 1.98]))
    assert torch.allclose(ema.shadow[1], torch.tensor([[-0.1]]))


def test_ema_keeps_fp32_shadow_for_bf16_params_and_roundtrips():
    p = [torch.ones(3, dtype=torch.bfloat16)]
    ema = EMA(p, decay=0.9999)
    ema.update([torch.full((3,), 2.0, dtype=torch.bfloat16)])
    assert ema.shadow[0].dtype == torch.float32
    assert float(ema.shadow[0][0]) == pytest.approx(1.0001)  # below bf16 resolution near 1
    other = EMA(p, decay=0.9999)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="tensors"):
        other.load_state_dict([])


def test_bands_cover_range_and_accumulate():
    edges = band_edges(-20, 20)
    assert edges[0] == -20 and edges[-1] == 20 and len(edges) == 9
    assert band_labels(edges)[0] == "lsnr_-20_-15"
    idx = band_index(torch.tensor([-20.0, -15.0, 0.0, 19.9, 20.0]), edges)
    assert idx.tolist() == [0, 1, 4, 7, 7]
    acc = BandAccumulator(edges)
    acc.add(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([-19.0, -18.0, 10.0]))
    assert acc.sums[0] == 4.0 and acc.counts[0] == 2 and acc.sums[6] == 5.0


def test_band_training_weights_match_how_often_training_draws_each_band():
    """val/loss weights = the share of training's t ~ U[0,1] draws landing in each band (Monte Carlo)."""
    from model.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion("v")
    edges = band_edges(-20, 20)
    weights = band_training_weights(edges, diffusion.t_of_logsnr)
    drawn = band_index(diffusion.logsnr(torch.rand(400_000, generator=torch.Generator().manual_seed(0))), edges)
    freq = torch.bincount(drawn, minlength=len(weights)).double() / drawn.numel()
    assert sum(weights) == pytest.approx(1.0)
    assert weights == pytest.approx(freq.tolist(), abs=3e-3)
    assert weights == pytest.approx(weights[::-1])  # the cosine schedule is symmetric in λ
    assert weights[3] + weights[4] > 0.3 > weights[0] + weights[-1]  # |λ| < 5 dominates, the ends barely count


def test_rng_state_roundtrip_all_generators(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)  # no pickled objects inside
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_progress_line_has_eta():
    line = progress_line(50, 100, 0.25, 1e-3, 2.0, 0.1, 0)
    assert "step 50/100" in line and "ETA 0:00:25" in line and "loss 0.2500" in line
    assert format_eta(math.nan) == "?"


class _Loader:
    def __init__(self, pos: int):
        self.pos = pos

    def state_dict(self):
        return {"pos": self.pos}


def test_checkpoints_keep_last_k_and_latest_fallback(tmp_path):
    from torch import nn

    from trainer.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
    from trainer.config import TrainConfig
    from trainer.distributed import init_distributed
    from trainer.strategies.base import build_strategy

    cfg = TrainConfig()
    cfg.run.precision = "fp32"
    s = build_strategy(cfg, init_distributed())
    s.setup(nn.Linear(3, 2))
    ema = EMA(s.local_params(), 0.5)
    saved_ema = {}
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            s.local_params()[0].fill_(float(step))
        ema.update(s.local_params())
        saved_ema[step] = [t.clone() for t in ema.shadow]
        save_checkpoint(s, tmp_path, step, ema=ema, loader_state=_Loader(step).state_dict(), state={"x": step},
                        keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000004"
    (root / "latest").unlink()  # a kill between rename and pointer update
    assert resolve_checkpoint(tmp_path).name == "step-000004"
    assert resolve_checkpoint(root / "step-000003").name == "step-000003"

    t = build_strategy(cfg, init_distributed())
    t.setup(nn.Linear(3, 2))
    ema2 = EMA(t.local_params(), 0.5)
    state = load_checkpoint(t, root / "step-000003", ema=ema2)
    assert state["step"] == 3 and state["x"] == 3 and state["loader"] == {"pos": 3}
    assert float(t.local_params()[0].detach()[0, 0]) == 3.0
    # exactly the EMA saved at step 3 (not the live step-4 EMA, not ema2's own random start)
    assert len(ema2.shadow) == len(saved_ema[3])
    assert all(torch.equal(a, b) for a, b in zip(ema2.shadow, saved_ema[3]))
    assert not torch.equal(saved_ema[3][0], saved_ema[4][0])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "elsewhere")
