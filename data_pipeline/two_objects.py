"""Synthetic clips of two shapes moving in different directions: "a red square moving left and a blue
circle moving up".

Why a second task: the one-shape demo is described by one global motion (a translation of the whole
clip), so `model.motion_conditioning`, which conditions every frame on that one measured motion, can
solve it without the network ever relating a word to a place in the frame. Here no single global
motion describes the clip: the network has to tie each direction word to its own object, as it must
for real captions (docs/motion.md, "A general network").

    python -m data_pipeline.two_objects OUT_DIR --n 64 [--frames 8 --size 32 --seed 0 --travel 0.3]

The two shapes always have different colours (the reader tells them apart by colour) and different
directions, and are placed so that they never overlap and never leave the frame.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from common.mp4 import write_video, x264_options
from data_pipeline.synthetic import COLOURS, DIRECTIONS, SHAPES, _shape_mask, inside_start, write_manifest

CAPTION = re.compile(r"^a (\w+) (\w+) moving (\w+) and a (\w+) (\w+) moving (\w+)$")
MAX_PLACEMENT_TRIES = 1000


def object_radius(height: int, width: int) -> float:
    """Smaller shapes than the one-shape clips' (a sixth of the frame): two of them and their travel must
    fit side by side in the frame without touching."""
    return max(2.0, min(height, width) / 8)


def two_object_caption(objects: list[tuple[str, str, str]]) -> str:
    """[(colour, shape, direction)] * 2 -> "a red square moving left and a blue circle moving up"."""
    return " and ".join(f"a {c} {s} moving {d}" for c, s, d in objects)


def parse_two_object_caption(caption: str) -> list[dict[str, str]] | None:
    """The caption's two objects as {colour, shape, direction}; None for any other caption."""
    m = CAPTION.match(caption.strip().lower())
    if m is None:
        return None
    objects = [{"colour": m[i], "shape": m[i + 1], "direction": m[i + 2]} for i in (1, 4)]
    for o in objects:
        if o["colour"] not in COLOURS or o["shape"] not in SHAPES or o["direction"] not in DIRECTIONS:
            return None
    return objects


def _centres(start: tuple[float, float], direction: str, frames: int, height: int, width: int,
             travel: float) -> np.ndarray:
    """[T, 2] (cy, cx) of a shape from `start` crossing `travel` of the frame along `direction`."""
    dx, dy = DIRECTIONS[direction]
    step = travel * (width if dx else height) / max(frames - 1, 1)
    t = np.arange(frames, dtype=np.float64)
    return np.stack([start[0] + dy * step * t, start[1] + dx * step * t], axis=1)


def place_two_objects(rng: np.random.Generator, directions: tuple[str, str], frames: int, height: int, width: int,
                      travel: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Starts for two shapes that stay inside the frame and whose squares of side 2r + 2 (the largest
    shape plus a pixel of background) never touch in any frame: rejection sampling over `inside_start`
    (which keeps the one-shape clips' larger margin from the edge)."""
    gap = 2 * object_radius(height, width) + 2
    for _ in range(MAX_PLACEMENT_TRIES):
        starts = tuple(inside_start(rng, d, height, width, travel) for d in directions)
        a, b = (_centres(s, d, frames, height, width, travel) for s, d in zip(starts, directions))
        if (np.abs(a - b).max(axis=1) > gap).all():
            return starts
    raise ValueError(f"no placement of two shapes moving {directions[0]} and {directions[1]} with travel={travel} "
                     f"keeps them apart in a {height}x{width} frame ({MAX_PLACEMENT_TRIES} tries); use a larger "
                     f"frame or a smaller travel")


def render_two_object_clip(objects: list[tuple[str, str, str]], starts, frames: int, height: int, width: int,
                           background: int = 24, travel: float = 0.3) -> np.ndarray:
    """[T, H, W, 3] uint8: each (colour, shape, direction) object drawn from its start, moving `travel`
    of the frame over the clip (no wrap-around)."""
    r = object_radius(height, width)
    out = np.full((frames, height, width, 3), background, dtype=np.uint8)
    for (colour, shape, direction), start in zip(objects, starts, strict=True):
        for t, (cy, cx) in enumerate(_centres(start, direction, frames, height, width, travel)):
            out[t][_shape_mask(shape, height, width, cy, cx, r)] = COLOURS[colour]
    return out


def draw_two_objects(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Two (colour, shape, direction) objects: different colours and different directions."""
    colours = rng.choice(list(COLOURS), size=2, replace=False)
    directions = rng.choice(list(DIRECTIONS), size=2, replace=False)
    return [(str(c), SHAPES[int(rng.integers(len(SHAPES)))], str(d)) for c, d in zip(colours, directions)]


def make_two_object_videos(out_dir: str | Path, n: int, frames: int = 8, size: int = 32, fps: float = 8,
                           seed: int = 0, travel: float = 0.3) -> str:
    """Write n two-object mp4 files + manifest.csv (key,path,caption) under out_dir; returns the manifest."""
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        objects = draw_two_objects(rng)
        starts = place_two_objects(rng, (objects[0][2], objects[1][2]), frames, size, size, travel)
        key = f"vid{i:06d}"
        path = out_dir / "videos" / f"{key}.mp4"
        write_video(path, render_two_object_clip(objects, starts, frames, size, size, travel=travel), fps,
                    codec="libx264", **x264_options())
        rows.append((key, str(path.resolve()), two_object_caption(objects)))
    return write_manifest(out_dir / "manifest.csv", rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--travel", type=float, default=0.3, help="share of the frame each shape crosses over the clip")
    a = p.parse_args(argv)
    print(make_two_object_videos(a.out_dir, a.n, a.frames, a.size, a.fps, a.seed, a.travel))


if __name__ == "__main__":
    main()
