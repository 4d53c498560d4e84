"""trainer.conditional_eval: PSNR/SSIM against closed forms, each task's baseline exact where it must
be, the reader check, and one evaluation of a tiny model on real synthetic clips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.loader import to_unit_range
from data_pipeline.synthetic import render_clip
from model.config import SamplingConfig, UNetConfig
from model.diffusion import GaussianDiffusion
from model.unet import SpaceTimeUNet
from trainer.conditional import Task
from trainer.conditional_eval import baseline, evaluate_task, psnr, reader_agreement, ssim

pytestmark = pytest.mark.usefixtures("one_thread")


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 4, 8, 8)
    y = x.clone()
    y[0] += 0.2  # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    y[1, :, :2] += 0.4  # mse 0.08 on half the values
    torch.testing.assert_close(psnr(y, x), torch.tensor([20.0, 10 * math.log10(4 / 0.08)]))
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_is_one_for_equal_clips_and_the_luminance_term_for_flat_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    a, b = 0.2, 0.7  # flat images in [0, 1]: no variance, so SSIM = (2ab + C1) / (a² + b² + C1)
    flat_a, flat_b = torch.full((1, 1, 2, 8, 8), 2 * a - 1), torch.full((1, 1, 2, 8, 8), 2 * b - 1)
    expected = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    torch.testing.assert_close(ssim(flat_a, flat_b), torch.tensor([expected]), atol=1e-4, rtol=0)  # fp32 variances
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (ssim(noisy, x) < 0.9).all() and torch.allclose(ssim(noisy, x), ssim(x, noisy))


def test_baselines_are_exact_where_the_task_is_trivial():
    t = torch.arange(8.0).reshape(1, 1, 8, 1, 1).expand(1, 3, 8, 8, 8) / 8 - 0.5  # brightness linear in time
    interp = Task("interpolate", 8, 8, factor=2)
    base = baseline(interp, interp.observe(t))
    gen = interp.generated_frames()
    assert gen == [1, 3, 5]
    torch.testing.assert_close(base[:, :, gen], t[:, :, gen])  # a linear blend recovers a linear ramp
    static = t[:, :, :1].expand(-1, -1, 8, -1, -1)
    predict = Task("predict", 8, 8, observed_frames=3)
    torch.testing.assert_close(baseline(predict, predict.observe(static)), static)
    flat = torch.full((1, 3, 8, 8, 8), 0.25)
    up = Task("upsample", 8, 8, factor=2)
    torch.testing.assert_close(baseline(up, up.observe(flat)), flat)


def _synthetic_clips(n: int, size: int = 16, frames: int = 8):
    dirs = ["right", "left", "down", "up"]
    videos = [render_clip("square", "red", dirs[i % 4], frames, size, size, start=(8.0, 8.0), travel=0.3)
              for i in range(n)]
    return to_unit_range(np.stack(videos))


def test_reader_agreement_counts_direction_and_colour():
    truth = _synthetic_clips(4)
    predict = Task("predict", 8, 16, observed_frames=4)
    assert reader_agreement(predict, truth, truth) == {"direction_acc": 1.0, "colour_acc": 1.0, "reader_clips": 4.0}
    reversed_motion = truth.flip(2)  # every clip moves the other way
    assert reader_agreement(predict, reversed_motion, truth)["direction_acc"] == 0.0


def test_evaluate_task_scores_a_tiny_model_against_truth_and_baseline():
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=3, out_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                     image_size=16, attention_resolutions=(8,), head_dim=8, cond_dim=16, text_dim=12, groups=4)
    model = SpaceTimeUNet(cfg)
    truth = _synthetic_clips(3)
    clips = [(truth[:2], torch.randn(2, 2, 12), torch.ones(2, 2, dtype=torch.bool)),
             (truth[2:], torch.randn(1, 2, 12), torch.ones(1, 2, dtype=torch.bool))]
    sampling = SamplingConfig(steps=2)
    for task in (Task("predict", 8, 16), Task("interpolate", 8, 16), Task("upsample", 8, 16)):
        r = evaluate_task(model, GaussianDiffusion("v"), task, clips, sampling=sampling, reader=True, batch=2)
        m = r.metrics
        for key in ("psnr", "psnr_baseline", "ssim", "ssim_baseline", "direction_acc", "colour_acc"):
            assert math.isfinite(m[f"{task.name}_{key}"]), (task.name, key)
        assert m[f"{task.name}_reader_clips"] == 3
        assert "3 clips, seed 0" in r.info[f"{task.name}_setup"] and "vs" in r.lines[0]
        # the example clip's observed part is in the completion
        ex = r.examples
        assert ex["completed"].shape == ex["truth"].shape == (3, 8, 16, 16)
        if task.name == "predict":
            torch.testing.assert_close(ex["completed"][:, :4], ex["truth"][:, :4])
        # an untrained model is no better than the baseline (the comparison is not rigged)
        assert m[f"{task.name}_psnr"] < m[f"{task.name}_psnr_baseline"]


def test_examples_are_written_without_pickle_and_drawn_as_labelled_rows(tmp_path):
    from bench.demo_picture import UPSCALE, conditional_picture
    from trainer.conditional_eval import observed_for_display, write_examples

    truth = _synthetic_clips(1)[0]
    tasks = {"interpolate": Task("interpolate", 8, 16), "upsample": Task("upsample", 8, 16)}
    examples = {name: {"observed": task.observe(truth[None])[0], "completed": truth, "truth": truth}
                for name, task in tasks.items()}
    shown = observed_for_display(tasks["interpolate"], examples["interpolate"]["observed"])
    assert (shown[:, 1::2] == -1).all() and torch.equal(shown[:, 0::2], truth[:, 0::2])
    assert observed_for_display(tasks["upsample"], examples["upsample"]["observed"]).shape == truth.shape
    assert len(write_examples(examples, tasks, tmp_path)) == 6
    assert np.load(tmp_path / "upsample.truth.npy", allow_pickle=False).shape == (8, 16, 16, 3)
    image = conditional_picture(tmp_path, tmp_path / "c.png")
    assert image.height == 2 * 3 * 16 * UPSCALE  # 2 tasks x (observed, generated, truth), one row of 8 frames each
    assert (tmp_path / "c.png").is_file()
