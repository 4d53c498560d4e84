"""The two-object task (data_pipeline.two_objects, docs/motion.md "A general network"): clips that no
single global motion describes, and the reader that scores each object's direction. The reader is
checked on the generated clips themselves (real h264, decoded and resized by the sharder's decoder to
the demo's 16 px) before any model is scored with it."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from test_synthetic_eval import _PromptEncoder

from data_pipeline.config import ClipConfig
from data_pipeline.synthetic import COLOURS, DIRECTIONS
from data_pipeline.two_object_reader import colour_labels, read_objects, score_two_objects
from data_pipeline.two_objects import (
    _centres,
    make_two_object_videos,
    object_radius,
    parse_two_object_caption,
    place_two_objects,
    render_two_object_clip,
    two_object_caption,
)
from data_pipeline.video import decode_clips
from model.config import SamplingConfig
from model.diffusion import GaussianDiffusion, alpha_sigma, broadcast_to
from trainer.two_object_eval import evaluate_two_objects, two_object_prompts


@pytest.fixture(scope="module")
def two_object_clips(tmp_path_factory) -> tuple[list[np.ndarray], list[str]]:
    """24 generated videos (32 px h264) as the demo's sharder reads them: 8 frames of 16x16."""
    manifest = make_two_object_videos(tmp_path_factory.mktemp("two_objects"), n=24, frames=8, size=32, seed=3)
    clip_cfg = ClipConfig(frames=8, fps=8, height=16, width=16, too_short="pad")
    clips, captions = [], []
    with open(manifest, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            _, decoded = decode_clips(row["path"], clip_cfg)
            clips.append(decoded[0].frames)
            captions.append(row["caption"])
    return clips, captions


def test_reader_reads_the_generated_clips_as_captioned_and_their_reversal_as_wrong(two_object_clips):
    clips, captions = two_object_clips
    assert clips[0].shape == (8, 16, 16, 3)
    acc = score_two_objects(clips, captions)
    assert acc["object_direction"] >= 0.95 and acc["object_present"] == 1.0, acc
    reversed_acc = score_two_objects([c[::-1] for c in clips], captions)
    assert reversed_acc["object_direction"] <= 0.05, reversed_acc


def test_every_clip_has_two_colours_and_two_directions_that_no_global_motion_describes(two_object_clips):
    for caption in two_object_clips[1]:
        first, second = parse_two_object_caption(caption)
        assert first["colour"] != second["colour"] and first["direction"] != second["direction"]


@pytest.mark.parametrize("directions", [("left", "up"), ("right", "left"), ("down", "up")])
def test_placement_keeps_both_shapes_inside_and_apart_in_every_frame(directions):
    rng = np.random.default_rng(0)
    size, frames, travel = 32, 8, 0.3
    r = object_radius(size, size)
    for _ in range(20):
        starts = place_two_objects(rng, directions, frames, size, size, travel)
        a, b = (_centres(s, d, frames, size, size, travel) for s, d in zip(starts, directions))
        assert (np.abs(a - b).max(axis=1) > 2 * r + 1).all()
        for c in (a, b):
            assert (c >= r).all() and (c <= size - 1 - r).all()


def test_placement_that_cannot_fit_says_why():
    with pytest.raises(ValueError, match="no placement of two shapes moving left and right with travel=0.3 keeps them "
                                         "apart in a 12x12 frame"):
        place_two_objects(np.random.default_rng(0), ("left", "right"), 8, 12, 12, 0.3)


def test_each_object_is_read_on_its_own():
    """One object moving the captioned way and the other not: exactly half the objects are right."""
    objects = [("red", "square", "left"), ("yellow", "circle", "up")]
    starts = place_two_objects(np.random.default_rng(1), ("left", "up"), 8, 32, 32, 0.3)
    clip = render_two_object_clip(objects, starts, 8, 32, 32)
    caption = two_object_caption(objects)
    assert score_two_objects([clip], [caption]) == {"object_direction": 1.0, "both_directions": 1.0,
                                                     "object_present": 1.0}
    wrong = two_object_caption([objects[0], ("yellow", "circle", "down")])
    assert score_two_objects([clip], [wrong])["object_direction"] == 0.5
    absent = two_object_caption([objects[0], ("blue", "circle", "up")])
    assert score_two_objects([clip], [absent]) == {"object_direction": 0.5, "both_directions": 0.0,
                                                    "object_present": 0.5}
    readings = read_objects(clip, ["red", "yellow"])
    assert readings["red"].displacement[0] < -5 and abs(readings["red"].displacement[1]) < 0.5


def test_a_blended_edge_pixel_keeps_its_colour():
    """Half yellow, half background lies nearer to red than to yellow in RGB, but on yellow's line."""
    yellow = np.array(COLOURS["yellow"], np.float32)
    pixel = np.round((yellow + 24) / 2).astype(np.uint8)
    labels = colour_labels(np.broadcast_to(pixel, (1, 1, 1, 3)))
    assert list(COLOURS)[labels[0, 0, 0]] == "yellow"


def test_foreign_captions_are_refused():
    with pytest.raises(ValueError, match="is not of the form"):
        score_two_objects([np.zeros((2, 4, 4, 3), np.uint8)], ["a red square moving left"])
    assert parse_two_object_caption("a red square moving left and a red circle moving sideways") is None


def test_prompt_grid_pairs_every_colour_and_gives_each_pair_two_directions():
    prompts = two_object_prompts(2)
    assert len(prompts) == 24
    parsed = [parse_two_object_caption(p) for p in prompts]
    assert all(a["direction"] != b["direction"] and a["colour"] != b["colour"] for a, b in parsed)
    assert {(a["colour"], b["colour"]) for a, b in parsed[:12]} == {(a, b) for a in COLOURS for b in COLOURS if a != b}
    assert {(o["colour"], o["direction"]) for pair in parsed for o in pair} == {(c, d) for c in COLOURS
                                                                                 for d in DIRECTIONS}


class _Oracle(torch.nn.Module):
    """A v-prediction denoiser whose samples are the clip of the prompt (rendered at twice the size and
    averaged down, as the demo's videos are; optionally reversed)."""

    def __init__(self, prompts: list[str], frames: int, size: int, reverse: bool):
        super().__init__()
        clips = []
        for i, p in enumerate(prompts):
            objects = [(o["colour"], o["shape"], o["direction"]) for o in parse_two_object_caption(p)]
            starts = place_two_objects(np.random.default_rng(i), (objects[0][2], objects[1][2]), frames, 2 * size,
                                       2 * size, 0.3)
            clip = render_two_object_clip(objects, starts, frames, 2 * size, 2 * size)
            clips.append(torch.from_numpy(clip[::-1].copy() if reverse else clip))
        video = torch.stack(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        self.register_buffer("clips", torch.nn.functional.avg_pool3d(video, (1, 2, 2)))

    def forward(self, z, logsnr, text_emb=None, text_mask=None, num_video_frames=None):
        x = self.clips[text_emb[:, 0, 0].long()]
        alpha, sigma = (broadcast_to(c.to(z.dtype), z) for c in alpha_sigma(logsnr))
        return alpha * (z - alpha * x) / sigma - sigma * x


@pytest.mark.parametrize("reverse", [False, True])
def test_evaluation_scores_an_oracle_right_and_its_reversal_wrong(reverse):
    prompts = two_object_prompts(1)
    oracle = _Oracle(prompts, frames=8, size=16, reverse=reverse)
    metrics = evaluate_two_objects(oracle, GaussianDiffusion(prediction="v"), _PromptEncoder(prompts), frames=8,
                                   size=16, seeds=1, sampling=SamplingConfig(steps=8, guidance_weight=0.0), batch=5)
    assert metrics["clips"] == 12 and metrics["object_present"] == 1.0
    assert metrics["object_direction"] == (0.0 if reverse else 1.0)
