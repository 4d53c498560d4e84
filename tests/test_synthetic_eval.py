"""The synthetic-task evaluation: the pixel reader against clips whose truth is known (rendered and
through real h264 shards), the score, and the whole sampling path with an oracle denoiser."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_pipeline.decode import decode_mp4
from data_pipeline.synthetic import COLOURS, DIRECTIONS, SHAPES, render_clip
from data_pipeline.synthetic_reader import Reading, direction_of, parse_caption, read_clip, score
from model.diffusion import GaussianDiffusion, alpha_sigma, broadcast_to
from trainer.synthetic_eval import OPPOSITE_DIRECTION as OPPOSITE
from trainer.synthetic_eval import caption_word_effect, evaluate_synthetic, prompt_grid


def _downscaled(clip: np.ndarray) -> np.ndarray:
    """2x2 area average, as the demo's 32 px videos become 16 px clips."""
    t, h, w, c = clip.shape
    return clip.reshape(t, h // 2, 2, w // 2, 2, c).astype(np.float32).mean(axis=(2, 4)).round().astype(np.uint8)


@pytest.mark.parametrize("size", [16, 32])
def test_reader_reads_every_rendered_colour_and_direction_including_wrap_around(size):
    rng = np.random.default_rng(0)
    readings, captions = [], []
    for colour in COLOURS:
        for direction in DIRECTIONS:
            for shape in SHAPES:
                # starts near an edge too, so some clips wrap around the frame
                start = (float(rng.uniform(0, size)), float(rng.uniform(0, size)))
                clip = render_clip(shape, colour, direction, 8, 2 * size, 2 * size, (2 * start[0], 2 * start[1]))
                clip = _downscaled(clip)
                readings.append(read_clip(clip))
                captions.append(f"a {colour} {shape} moving {direction}")
                reversed_reading = read_clip(clip[::-1])
                assert reversed_reading.direction == OPPOSITE[direction], (captions[-1], reversed_reading)
    acc = score(readings, captions)
    assert acc["colour"] == 1.0 and acc["direction"] == 1.0 and acc["colour_and_direction"] == 1.0
    assert acc["shape"] >= 0.85, acc


def test_reader_on_real_h264_shards_matches_their_captions(trainer_shards, synthetic_videos, tmp_path):
    """Clips made by the real sharder (h264 at 16 px, the demo's geometry) read back as captioned."""
    import subprocess
    import sys

    from trainer_helpers import REPO, subprocess_env

    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", "configs/shard/demo.yaml",
                        "--manifest", synthetic_videos, "--out", str(out), "--encoder", trainer_shards[1],
                        "--workers", "1", "--no-progress"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    readings, captions = [], []
    for shard in sorted(Path(out).glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, _, suffix = m.name.partition(".")
                members.setdefault(key, {})[suffix] = tf.extractfile(m).read()
        for parts in members.values():
            readings.append(read_clip(decode_mp4(parts["mp4"], 8)))
            captions.append(parts["txt"].decode())
    assert len(readings) == 12
    acc = score(readings, captions)
    assert acc["colour"] == 1.0 and acc["direction"] == 1.0, list(zip(captions, readings))


def test_reader_says_none_for_a_static_or_empty_clip():
    clip = render_clip("square", "red", "right", 8, 16, 16, (8.0, 8.0))
    static = np.repeat(clip[:1], 8, axis=0)
    assert read_clip(static).direction is None
    empty = np.full((8, 16, 16, 3), 24, np.uint8)
    assert read_clip(empty) == Reading(None, None, None, (0.0, 0.0))
    assert direction_of(0.4, -0.3) is None and direction_of(0.4, -2.0) == "up"


def test_score_counts_each_attribute_and_rejects_foreign_captions():
    readings = [Reading("red", "square", "right", (4.0, 0.0)), Reading("red", "circle", "left", (-4.0, 0.0)),
                Reading("blue", "square", "up", (0.0, -4.0)), Reading("green", "square", None, (0.0, 0.0))]
    captions = ["a red square moving right", "a red square moving right", "a red square moving down",
                "a green square moving up"]
    acc = score(readings, captions)
    assert acc == {"colour": 0.75, "shape": 0.75, "direction": 0.25, "colour_and_direction": 0.25, "axis": 0.75}
    with pytest.raises(ValueError, match="fireworks"):
        score(readings[:1], ["fireworks over a city"])
    assert parse_caption("A Red Circle moving Left") == {"colour": "red", "shape": "circle", "direction": "left"}


def test_prompt_grid_covers_every_colour_direction_cell_per_seed_and_every_shape():
    prompts, seed_of = prompt_grid(3)
    assert len(prompts) == 3 * len(COLOURS) * len(DIRECTIONS) and seed_of.count(2) == 16
    cells = {(parse_caption(p)["colour"], parse_caption(p)["direction"]) for p in prompts[:16]}
    assert len(cells) == 16
    assert {parse_caption(p)["shape"] for p in prompts} == set(SHAPES)


# ---------------------------------------------------------------------------------------- oracle
def _word_effect_prompts() -> list[str]:
    """The prompts `caption_word_effect` encodes (every colour x direction, squares)."""
    return [f"a {c} square moving {d}" for c in COLOURS for d in DIRECTIONS]


class _PromptEncoder:
    """Encodes a prompt as its index in a fixed list (a one-token 'embedding')."""

    def __init__(self, prompts: list[str]):
        self.prompts = list(prompts)

    def encode_padded(self, captions):
        emb = torch.tensor([[float(self.prompts.index(c))] for c in captions])[:, :, None]
        return emb, torch.ones(len(captions), 1, dtype=torch.bool)


class _Oracle(nn.Module):
    """A v-prediction denoiser that knows the answer: the rendered clip for the prompt (optionally
    played backwards). Its samples are that clip, so the evaluation must score them right (or, for
    `reverse`, with every direction wrong)."""

    def __init__(self, prompts: list[str], frames: int, size: int, reverse: bool = False,
                 ignore_direction: bool = False):
        super().__init__()
        clips = []
        for p in prompts:
            t = parse_caption(p)
            direction = "right" if ignore_direction else t["direction"]
            clip = render_clip(t["shape"], t["colour"], direction, frames, size, size, (size / 2, size / 2))
            clips.append(torch.from_numpy(clip[::-1].copy() if reverse else clip))
        self.register_buffer("clips", torch.stack(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1)

    def forward(self, z, logsnr, text_emb=None, text_mask=None, num_video_frames=None):
        x = self.clips[text_emb[:, 0, 0].long()][:, :, : z.shape[2]]
        alpha, sigma = (broadcast_to(c.to(z.dtype), z) for c in alpha_sigma(logsnr))
        eps = (z - alpha * x) / sigma
        return alpha * eps - sigma * x


@pytest.mark.parametrize("reverse", [False, True])
def test_evaluate_synthetic_scores_an_oracle_right_and_its_reversal_wrong(reverse):
    prompts = prompt_grid(1)[0] + _word_effect_prompts()  # the encoder knows every prompt the evaluation asks for
    oracle = _Oracle(prompts, frames=8, size=16, reverse=reverse)
    report = evaluate_synthetic(oracle, GaussianDiffusion(prediction="v"), _PromptEncoder(prompts), frames=8, size=16,
                                seeds=1, sampling={"steps": 8, "guidance_weight": 0.0}, batch=5)
    assert report.clips == 16 and report.seconds > 0
    assert report.metrics["colour"] == 1.0
    assert report.metrics["direction"] == (0.0 if reverse else 1.0)
    assert report.metrics["axis"] == 1.0
    assert "16/16" not in report.table() and "colour+direction" in report.table()


def test_extension_score_needs_motion_that_continues_across_the_window_boundary():
    """The oracle ignores the frames it is conditioned on, so each window restarts the motion: the
    second window jumps back and the frames after the boundary do not move as captioned."""
    prompts = prompt_grid(1)[0] + _word_effect_prompts()
    oracle = _Oracle(prompts, frames=8, size=16)
    report = evaluate_synthetic(oracle, GaussianDiffusion(prediction="v"), _PromptEncoder(prompts), frames=8, size=16,
                                seeds=1, sampling={"steps": 4, "guidance_weight": 0.0}, extension=True)
    assert report.metrics["direction"] == 1.0
    assert report.extension["direction_after_boundary"] < 0.5
    assert report.clips == 32


@pytest.mark.parametrize("ignore_direction", [False, True])
def test_caption_word_effect_is_zero_exactly_for_the_word_a_model_ignores(ignore_direction):
    prompts = _word_effect_prompts()
    oracle = _Oracle(prompts, frames=8, size=16, ignore_direction=ignore_direction)
    effect = caption_word_effect(oracle, _PromptEncoder(prompts), frames=8, size=16)
    assert effect["colour_word_effect"] > 0.05
    if ignore_direction:
        assert effect["direction_word_effect"] == 0.0
    else:
        assert effect["direction_word_effect"] > 0.05
    assert effect["logsnr"] == -4.0


def test_evaluate_synthetic_reports_the_word_effect_in_its_table():
    prompts = prompt_grid(1)[0] + _word_effect_prompts()
    oracle = _Oracle(prompts, frames=8, size=16, ignore_direction=True)
    report = evaluate_synthetic(oracle, GaussianDiffusion(prediction="v"), _PromptEncoder(prompts), frames=8, size=16,
                                seeds=1, sampling={"steps": 4, "guidance_weight": 0.0})
    assert report.word_effect["direction_word_effect"] == 0.0
    assert "the opposite direction moves the prediction 0.0%" in report.table()
