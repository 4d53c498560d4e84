"""Motion conditioning (model/motion.py): the global-motion measurement on real rendered clips, the
injected regression gradient against autograd's, the U-Net's use of measured vs predicted motion, and
the trainer teaching the caption->motion head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trainer_inprocess import _cfg, _trainer

from data_pipeline.synthetic import DIRECTIONS, SHAPES, inside_start, render_clip
from model.config import UNetConfig
from model.motion import _TeachAndRegress, global_motion
from model.unet import SpaceTimeUNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _clip(shape: str, direction: str, rng, frames: int = 8, size: int = 16, travel: float = 0.3) -> torch.Tensor:
    video = render_clip(shape, "red", direction, frames, size, size, inside_start(rng, direction, size, size, travel),
                        travel=travel)
    return torch.from_numpy(video).permute(3, 0, 1, 2).float()[None] / 127.5 - 1  # [1, C, F, H, W]


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_global_motion_reads_sign_and_axis_of_rendered_clips(direction):
    rng = np.random.default_rng(0)
    want = torch.tensor(DIRECTIONS[direction], dtype=torch.float32)  # (dx, dy) unit step of the renderer
    for shape in SHAPES:
        m = global_motion(_clip(shape, direction, rng))[0]
        along, across = (m * want).sum(), (m * want.flip(0)).sum()
        assert along > 0.05, (shape, m)  # the shapes cross 0.3 of the frame; the estimate is biased low
        assert abs(across) < 0.2 * along, (shape, m)


def test_global_motion_of_a_translated_texture_matches_the_shift():
    """A smooth texture rolled by 0.5 px per frame (bilinear): LK is near exact for sub-pixel motion."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 40, 40, generator=g), 5, 1, 2)
    frames = []
    for t in range(6):
        shift = 0.5 * t  # px to the right
        lo = int(np.floor(shift))
        a = shift - lo
        frames.append((1 - a) * torch.roll(base, lo, 3) + a * torch.roll(base, lo + 1, 3))
    video = torch.stack(frames, 2).expand(1, 3, 6, 40, 40) * 2 - 1
    dx, dy = global_motion(video)[0].tolist()
    assert dx == pytest.approx(0.5 * 5 / 40, rel=0.15)
    assert abs(dy) < 0.1 * dx


def test_global_motion_is_zero_without_motion_or_time():
    still = _clip("square", "right", np.random.default_rng(0))[:, :, :1].expand(2, 3, 5, 16, 16)
    assert global_motion(still).abs().max() < 1e-6
    assert torch.equal(global_motion(still[:, :, :1]), torch.zeros(2, 2))
    assert torch.equal(global_motion(torch.zeros(2, 3, 4, 8, 8)), torch.zeros(2, 2))  # no texture


def test_injected_gradient_equals_the_regression_loss_gradient():
    measured = torch.randn(4, 2)
    rows = torch.tensor([True, False, True, True])
    pred = torch.randn(4, 2, requires_grad=True)
    out = _TeachAndRegress.apply(measured, pred, rows, 0.7)
    assert torch.equal(out, measured)  # forward: teacher forcing
    (out * torch.randn(4, 2)).sum().backward()  # whatever arrives from above is ignored
    ref = pred.detach().clone().requires_grad_(True)
    (0.7 * ((ref - measured).square().sum(1) * rows).sum() / 4).backward()
    torch.testing.assert_close(pred.grad, ref.grad)


def _tiny_unet() -> SpaceTimeUNet:
    torch.manual_seed(0)
    cfg = UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, image_size=8,
                     attention_resolutions=(4,), head_dim=8, cond_dim=32, text_dim=32, groups=4,
                     motion_conditioning=True)
    model = SpaceTimeUNet(cfg).eval()
    with torch.no_grad():  # zero-initialised layers (the motion code, the output conv): give them a voice
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


def test_unet_uses_measured_motion_when_given_and_the_caption_prediction_otherwise():
    model = _tiny_unet()
    z, lam = torch.randn(2, 3, 4, 8, 8), torch.zeros(2)
    text, mask = torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        predicted = model.motion_cond.predict(text, mask)
        by_default = model(z, lam, text, mask)
        given_prediction = model(z, lam, text, mask, motion=predicted)
        other = model(z, lam, text, mask, motion=predicted + torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(by_default, given_prediction)
    assert (other - by_default).abs().max() > 1e-3


def test_rows_without_a_caption_get_no_motion_term():
    model = _tiny_unet()
    z, lam = torch.randn(2, 3, 4, 8, 8), torch.zeros(2)
    text, dropped = torch.randn(2, 3, 32), torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        a = model(z, lam, text, dropped, motion=torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        b = model(z, lam, text, dropped)
        c = model(z, lam, None, None)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b, c)


def test_trainer_measures_motion_and_teaches_the_head(tmp_path):
    cfg = _cfg(tmp_path, model={"motion_conditioning": True}, run={"steps": 3, "ckpt_every": 100})
    trainer = _trainer(cfg)
    head = trainer.strategy.module.motion_cond.head
    before = [p.detach().clone() for p in head.parameters()]
    assert trainer.train() == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, head.parameters()))


def test_fp16_with_motion_conditioning_is_refused(tmp_path):
    cfg = _cfg(tmp_path, model={"motion_conditioning": True}, run={"precision": "fp16"})
    with pytest.raises(ValueError, match="motion_conditioning.*fp16"):
        _trainer(cfg)
