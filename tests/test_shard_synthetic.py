"""Synthetic videos are real, decodable h264 files whose captions match their pixels."""

from __future__ import annotations

import csv
import hashlib

import av
import numpy as np
import pytest

from data_pipeline.synthetic import COLOURS, make_synthetic_videos


def _rows(manifest):
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_synthetic_videos_decode_and_match_caption(synthetic_videos):
    rows = _rows(synthetic_videos)
    assert len(rows) == 12 and set(rows[0]) == {"key", "path", "caption"}
    for row in rows[:4]:
        with av.open(row["path"]) as c:
            assert c.streams.video[0].codec_context.name == "h264"
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 16 and frames[0].shape == (32, 32, 3)
        colour = row["caption"].split()[1]
        target = np.array(COLOURS[colour], dtype=np.float32)
        # the most target-like pixel is close to the caption's colour (lossy h264, so not exact)
        dist = np.abs(frames[0].reshape(-1, 3).astype(np.float32) - target).sum(-1)
        assert dist.min() < 60, (row["caption"], dist.min())
        # it moves: first and last frames differ
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).sum() > 0


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a = _rows(make_synthetic_videos(tmp_path / "a", n=3, frames=8, size=32, seed=5))
    b = _rows(make_synthetic_videos(tmp_path / "b", n=3, frames=8, size=32, seed=5))
    c = _rows(make_synthetic_videos(tmp_path / "c", n=3, frames=8, size=32, seed=6))
    for ra, rb in zip(a, b):  # the same bytes: the encode is pinned (single-threaded, fixed options)
        assert open(ra["path"], "rb").read() == open(rb["path"], "rb").read(), ra["path"]
    assert [r["caption"] for r in a] == [r["caption"] for r in b]
    digest = [hashlib.sha256(open(r["path"], "rb").read()).hexdigest() for r in a]
    assert digest != [hashlib.sha256(open(r["path"], "rb").read()).hexdigest() for r in c]


def test_shapes_stay_inside_the_frame_and_move_as_captioned():
    """Starts are drawn so the shape never touches an edge (no wrap-around jumps) for any direction."""
    from data_pipeline.synthetic import DIRECTIONS, SHAPES, inside_start, render_clip
    from data_pipeline.synthetic_reader import read_clip

    rng = np.random.default_rng(0)
    for direction in DIRECTIONS:
        for i in range(20):
            start = inside_start(rng, direction, 32, 32, travel=0.3)
            clip = render_clip(SHAPES[i % 3], "red", direction, 8, 32, 32, start, travel=0.3)
            shape = np.abs(clip.astype(int) - 24).sum(-1) > 0
            edges = shape[:, 0].any() or shape[:, -1].any() or shape[:, :, 0].any() or shape[:, :, -1].any()
            assert not edges, (direction, start)
            assert read_clip(clip).direction == direction
    import pytest

    with pytest.raises(ValueError, match="travel"):
        inside_start(rng, "right", 32, 32, travel=0.9)


def test_directions_restrict_what_is_drawn(tmp_path):
    """The motion ablations (docs/motion.md) need clips that all move one way, or only left/right."""
    from data_pipeline.synthetic import main

    only_right = _rows(make_synthetic_videos(tmp_path / "r", n=6, frames=8, size=32, seed=3, directions=["right"]))
    assert {r["caption"].split()[-1] for r in only_right} == {"right"}
    main([str(tmp_path / "lr"), "--n", "8", "--frames", "8", "--directions", "left,right"])
    lr = _rows(str(tmp_path / "lr" / "manifest.csv"))
    assert {r["caption"].split()[-1] for r in lr} == {"left", "right"}
    with pytest.raises(ValueError, match="sideways"):
        make_synthetic_videos(tmp_path / "bad", n=1, frames=8, size=32, directions=["sideways"])
