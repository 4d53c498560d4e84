"""trainer.conditional: a real mp4 (written by the project's own writer) read as the data pipeline reads
clips, completed by a tiny SpaceTimeUNet for each task; the observed part comes back in the output
where the operator says it is, and the output has the task's length and size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.config import ClipConfig
from data_pipeline.loader import to_unit_range
from data_pipeline.synthetic import render_clip
from data_pipeline.video import decode_clips
from model.config import SamplingConfig, UNetConfig
from model.diffusion import GaussianDiffusion
from model.observation import AveragePool
from model.unet import SpaceTimeUNet
from trainer.conditional import Task, _window_starts, complete, load_condition_video
from trainer.video_io import write_mp4

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW, SIZE = 4, 8
SAMPLING = SamplingConfig(steps=2, guidance_weight=1.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=3, out_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                     image_size=SIZE, attention_resolutions=(4,), head_dim=8, cond_dim=16, text_dim=12, groups=4)
    return SpaceTimeUNet(cfg)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    """11 frames of a red square moving right, 32x24 (not square: the loader's crop applies)."""
    frames = render_clip("square", "red", "right", 11, 24, 32, start=(12.0, 6.0), travel=0.5, wrap=False)
    return write_mp4(tmp_path_factory.mktemp("cond") / "in.mp4", frames, fps=8)


def test_condition_video_is_read_as_the_pipeline_reads_clips(mp4):
    task = Task("upsample", window=WINDOW, size=SIZE, factor=2)
    got = load_condition_video(mp4, task, frames=6, fps=8)
    _, clips = decode_clips(str(mp4), ClipConfig(frames=6, fps=8, height=4, width=4))
    assert got.shape == (1, 3, 6, 4, 4)
    torch.testing.assert_close(got, to_unit_range(clips[0].frames[None]))
    # asking for more frames than the video has gives the real ones, not the pipeline's padding
    assert load_condition_video(mp4, Task("predict", WINDOW, SIZE), frames=40, fps=8).shape[2] == 11


def test_window_starts_cover_every_item_with_full_windows():
    assert _window_starts(4, 4, 4) == [0] and _window_starts(3, 4, 4) == [0]
    assert _window_starts(11, 4, 4) == [0, 4, 7]
    assert _window_starts(7, 3, 2) == [0, 2, 4]  # interpolation: neighbours share one observed frame
    assert _window_starts(8, 3, 2) == [0, 2, 4, 5]


@pytest.mark.parametrize("guidance", ["reconstruction", "replacement"])
def test_predict_keeps_the_observed_frames_and_continues_past_the_window(model, mp4, guidance):
    task = Task("predict", WINDOW, SIZE, observed_frames=2)
    observed = load_condition_video(mp4, task, frames=2, fps=8)
    emb, mask = torch.randn(1, 3, 12), torch.tensor([[True, True, False]])
    out = complete(model, GaussianDiffusion("v"), task, observed, sampling=SAMPLING, text_emb=emb, text_mask=mask,
                   total_frames=7, guidance=guidance, seed=1)
    assert out.shape == (1, 3, 7, SIZE, SIZE) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, :2], observed)
    again = complete(model, GaussianDiffusion("v"), task, observed, sampling=SAMPLING, text_emb=emb,
                     text_mask=mask, total_frames=7, guidance=guidance, seed=1)
    assert torch.equal(out, again)
    assert all(p.grad is None for p in model.parameters())


def test_interpolate_lays_windows_so_every_observed_frame_lands_at_factor_times_its_index(model, mp4):
    task = Task("interpolate", WINDOW, SIZE, factor=3)  # windows observe frames 0 and 3
    observed = load_condition_video(mp4, task, frames=5, fps=8)
    out = complete(model, GaussianDiffusion("v"), task, observed, sampling=SAMPLING, seed=0, batch=3)
    assert out.shape == (1, 3, 3 * 4 + 1, SIZE, SIZE)
    torch.testing.assert_close(out[:, :, ::3], observed)
    assert task.output_fps(8) == 24 and task.generated_frames() == [1, 2]


@pytest.mark.parametrize("frames", [3, 6])
def test_upsample_output_pools_back_to_the_observed_low_resolution(model, mp4, frames):
    task = Task("upsample", WINDOW, SIZE, factor=2)
    observed = load_condition_video(mp4, task, frames=frames, fps=8)
    emb, mask = torch.randn(1, 3, 12), torch.ones(1, 3, dtype=torch.bool)
    out = complete(model, GaussianDiffusion("v"), task, observed, sampling=SAMPLING, text_emb=emb, text_mask=mask)
    assert out.shape == (1, 3, frames, SIZE, SIZE)
    # exact before the final clamp to [-1, 1] (the untrained model clips a lot): blocks without a clipped pixel
    pool = AveragePool(2)
    unclipped = pool.observe((out.abs() < 1).float()) == 1
    assert unclipped.float().mean() > 0.05
    torch.testing.assert_close(pool.observe(out)[unclipped], observed[unclipped], atol=1e-5, rtol=0)


def test_tasks_name_what_is_wrong():
    with pytest.raises(ValueError, match="task 'inpaint'"):
        Task("inpaint", WINDOW, SIZE)
    with pytest.raises(ValueError, match="does not divide"):
        Task("upsample", WINDOW, SIZE, factor=3)
    with pytest.raises(ValueError, match="interpolation factor"):
        Task("interpolate", WINDOW, SIZE, factor=4)
    with pytest.raises(ValueError, match="observed frames are 8x8, expected 4x4"):
        complete(None, GaussianDiffusion("v"), Task("upsample", WINDOW, SIZE), torch.zeros(1, 3, 4, 8, 8),
                 sampling=SAMPLING)


def test_a_file_that_is_not_a_video_is_named(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="notes.mp4: cannot use as the observed video"):
        load_condition_video(bad, Task("predict", WINDOW, SIZE), frames=2, fps=8)
