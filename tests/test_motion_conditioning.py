"""Motion conditioning (model/motion.py): the global-motion measurement on real rendered clips and on
warped textures with known pan, zoom and rotation, the regression loss, the U-Net's use of measured vs
predicted motion, and the trainer teaching the caption->motion head through its auxiliary loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_trainer_inprocess import _cfg, _trainer

from data_pipeline.synthetic import DIRECTIONS, SHAPES, inside_start, render_clip
from model.config import UNetConfig
from model.motion import MotionConditioning, global_motion
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
        m = global_motion(_clip(shape, direction, rng))[0, :2]
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
    dx, dy, zoom, rotation = global_motion(video)[0].tolist()
    assert dx == pytest.approx(0.5 * 5 / 40, rel=0.15)
    assert max(abs(dy), abs(zoom), abs(rotation)) < 0.1 * dx


def test_global_motion_is_zero_without_motion_or_time():
    still = _clip("square", "right", np.random.default_rng(0))[:, :, :1].expand(2, 3, 5, 16, 16)
    assert global_motion(still).abs().max() < 1e-6
    assert torch.equal(global_motion(still[:, :, :1]), torch.zeros(2, 4))
    assert torch.equal(global_motion(torch.zeros(2, 3, 4, 8, 8)), torch.zeros(2, 4))  # no texture


def test_regression_loss_is_the_mean_over_the_batch_of_captioned_rows_squared_error():
    measured, pred = torch.randn(4, 4), torch.randn(4, 4)
    rows = torch.tensor([True, False, True, True])
    want = ((pred - measured).square().sum(1) * rows).sum() / 4
    torch.testing.assert_close(MotionConditioning.regression_loss(pred, measured, rows), want)


def test_conditioning_motion_is_teacher_forced_and_carries_no_gradient_to_the_head():
    measured, pred = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    rows = torch.tensor([True, False, True])
    chosen = MotionConditioning.motion(pred, measured, rows)
    torch.testing.assert_close(chosen, measured * rows[:, None])
    assert not chosen.requires_grad
    torch.testing.assert_close(MotionConditioning.motion(pred, None, rows), pred.detach() * rows[:, None])


def _warped_texture(pan: tuple[float, float] = (0.0, 0.0), zoom: float = 0.0, rotation: float = 0.0,
                    frames: int = 6, size: int = 48) -> torch.Tensor:
    """[1, 3, F, size, size]: a smooth random texture under a similarity transform about the frame centre
    that grows per frame: pan (share of the frame per frame, right/down), zoom (log scale per frame),
    rotation (radians per frame, clockwise on screen)."""
    import math

    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 2 * size, 2 * size, generator=g), 7, 1, 3)
    base = torch.nn.functional.avg_pool2d(base, 5, 1, 2)
    out = []
    for t in range(frames):
        c, s, k = math.cos(rotation * t), math.sin(rotation * t), math.exp(-zoom * t)
        inverse = torch.tensor([[c, s], [-s, c]]) * k  # output point -> source point
        shift = torch.tensor([2 * pan[0] * t, 2 * pan[1] * t])  # normalised coordinates span 2
        theta = torch.cat([inverse, -(inverse @ shift)[:, None]], 1)[None] * 0.5  # the texture's middle half
        grid = torch.nn.functional.affine_grid(theta, (1, 1, size, size), align_corners=False)
        out.append(torch.nn.functional.grid_sample(base, grid, align_corners=False, padding_mode="border"))
    return torch.stack(out, 2).expand(1, 3, frames, size, size) * 2 - 1


@pytest.mark.parametrize("pan, zoom, rotation", [
    ((0.01, 0.0), 0.0, 0.0), ((0.0, -0.01), 0.0, 0.0), ((0.0, 0.0), 0.03, 0.0), ((0.0, 0.0), -0.03, 0.0),
    ((0.0, 0.0), 0.0, 0.04), ((0.0, 0.0), 0.0, -0.04), ((0.005, 0.005), 0.02, 0.03)])
def test_global_motion_fits_pan_zoom_and_rotation_of_a_warped_texture(pan, zoom, rotation):
    """Closed form: over 5 frame steps the content pans 5 x pan of the frame, its log scale grows by
    5 x zoom and it turns 5 x rotation radians; the linearised fit is within 15% (plus 0.004 absolute)."""
    want = torch.tensor([5 * pan[0], 5 * pan[1], 5 * zoom, 5 * rotation])
    got = global_motion(_warped_texture(pan, zoom, rotation))[0]
    torch.testing.assert_close(got, want, rtol=0.15, atol=0.004)


def test_global_motion_measures_full_frames_at_the_work_size():
    """A 4x larger frame area-averaged to the same work size reads the same motion (pan is in units of
    the short side, so it does not depend on the resolution)."""
    small = _warped_texture((0.01, 0.0), 0.02, 0.0, size=48)
    big = torch.nn.functional.interpolate(small[0].transpose(0, 1), scale_factor=4, mode="bilinear",
                                          align_corners=False).transpose(0, 1)[None]
    torch.testing.assert_close(global_motion(big, work_size=48), global_motion(small), rtol=0.1, atol=0.003)


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
        other = model(z, lam, text, mask, motion=predicted + torch.tensor([0.5, -0.5, 0.2, -0.2]))
        out, aux = model(z, lam, text, mask, motion=predicted, return_aux_losses=True)
        _, at_sampling = model(z, lam, text, mask, return_aux_losses=True)
    torch.testing.assert_close(by_default, given_prediction)
    assert (other - by_default).abs().max() > 1e-3
    torch.testing.assert_close(out, given_prediction)
    assert aux["motion_loss"] == 0.0 and at_sampling == {}  # the prediction regressed on itself; nothing to learn


def test_rows_without_a_caption_get_no_motion_term():
    model = _tiny_unet()
    z, lam = torch.randn(2, 3, 4, 8, 8), torch.zeros(2)
    text, dropped = torch.randn(2, 3, 32), torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        a = model(z, lam, text, dropped, motion=torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, -1.0, 0.0, 0.5]]))
        b = model(z, lam, text, dropped)
        c = model(z, lam, None, None)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b, c)


def test_trainer_measures_motion_and_teaches_the_head_logging_its_loss(tmp_path):
    cfg = _cfg(tmp_path, model={"motion_conditioning": True},
               run={"steps": 3, "ckpt_every": 100, "caption_dropout": 0.0})
    trainer = _trainer(cfg)
    head = trainer.strategy.module.motion_cond.head
    before = [p.detach().clone() for p in head.parameters()]
    assert trainer.train() == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, head.parameters()))
    trainer.close()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(rec["motion_loss"] > 0 for rec in log), log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [e.value for e in acc.Scalars("train/motion_loss")]  # run.log_every 1: one step per line
    assert logged == pytest.approx([rec["motion_loss"] for rec in log], rel=1e-5)


def test_fp16_with_motion_conditioning_trains_the_head_through_the_scaled_loss(tmp_path):
    cfg = _cfg(tmp_path, model={"motion_conditioning": True}, run={"precision": "fp16", "steps": 2,
                                                                    "ckpt_every": 100})
    trainer = _trainer(cfg)
    head = trainer.strategy.module.motion_cond.head
    before = [p.detach().clone() for p in head.parameters()]
    assert trainer.train() == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, head.parameters()))


def test_a_negative_motion_loss_weight_is_refused():
    with pytest.raises(ValueError, match="model.motion_loss_weight must be >= 0"):
        UNetConfig(motion_conditioning=True, motion_loss_weight=-1.0)
