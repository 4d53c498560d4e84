"""Synthetic captioned videos: moving coloured shapes whose captions say exactly what moves where.

Tests, the demo and benchmarks need real video files (real h264 through the real decoder) with
captions a tiny model can learn ("a red square moving right"), made offline in seconds and
identical for the same seed.

    python -m data_pipeline.synthetic OUT_DIR --n 64 [--frames 24 --size 32 --fps 8 --seed 0 --travel 0.3]
        [--directions right | left,right]

`--directions` restricts the directions drawn: the motion ablations in docs/motion.md use clips that
all move right (can the model learn an arrow of time at all?) and clips that move left or right
(can it take the sign of motion from the caption?). `--transforms` also draws shapes that stay in
place and grow, shrink or turn ("a red square growing", "a blue triangle turning clockwise"): the
motion kinds a single translation cannot describe (`make_motion_kind_videos`, docs/motion.md).
"""

from __future__ import annotations

import argparse
import csv
import inspect
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from common.mp4 import write_video, x264_options

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _shape_mask(shape: str, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    # triangle pointing up: inside when below the apex lines and above the base
    return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)


def shape_radius(height: int, width: int) -> float:
    return max(2.0, min(height, width) / 6)


def render_clip(shape: str, colour: str, direction: str, frames: int, height: int, width: int,
                start: tuple[float, float], background: int = 24, travel: float = 0.6,
                wrap: bool = True) -> np.ndarray:
    """[T, H, W, 3] uint8: the shape crosses `travel` of the frame over the clip; a shape that
    leaves the frame wraps around, or with `wrap=False` leaves it as objects leave a camera's view
    (`inside_start` picks starts where it never reaches the edge)."""
    r = shape_radius(height, width)
    dx, dy = DIRECTIONS[direction]
    travel = travel * (width if dx else height)
    step = travel / max(frames - 1, 1)
    out = np.full((frames, height, width, 3), background, dtype=np.uint8)
    cy0, cx0 = start
    for t in range(frames):
        cy, cx = cy0 + dy * step * t, cx0 + dx * step * t
        if wrap:
            cy, cx = cy % height, cx % width
        out[t][_shape_mask(shape, height, width, cy, cx, r)] = COLOURS[colour]
    return out


def inside_start(rng: np.random.Generator, direction: str, height: int, width: int,
                 travel: float, room: float = 1.0) -> tuple[float, float]:
    """A start (cy, cx) from which the shape stays wholly inside the frame for the whole clip, and for
    `room` times the clip's travel (room > 1 leaves space to keep moving after the clip ends).

    Why not wrap around: a shape leaving at one edge and re-entering at the other is a jump across
    the frame, not motion. With the old uniform starts about 40% of clips wrapped, and a model
    trained on them learns that shapes may jump, not which way they move (docs/model.md, "Learning
    the direction of motion").
    """
    r = shape_radius(height, width) + 0.5  # pixel p is inside when |p - centre| <= radius
    dx, dy = DIRECTIONS[direction]
    start = []
    for side, d in ((height, dy), (width, dx)):
        span = room * travel * side if d else 0.0
        low, high = r + (span if d < 0 else 0.0), side - 1 - r - (span if d > 0 else 0.0)
        if low > high:
            raise ValueError(f"travel={travel} (x room={room}) does not fit a {height}x{width} frame without "
                             f"wrapping (travel at most {(side - 1 - 2 * r) / side / room:.2f})")
        start.append(float(rng.uniform(low, high)))
    return start[0], start[1]


def write_manifest(path: str | Path, rows: Iterable[tuple[str, str, str]]) -> str:
    """(key, path, caption) rows → a csv manifest in our own column layout; returns its path."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "path", "caption"])
        writer.writerows(rows)
    return str(path)


def textured_clip(rng: np.random.Generator, frames: int, height: int, width: int) -> tuple[np.ndarray, str]:
    """([T, H, W, 3] uint8, caption): a camera pan over a smooth random texture with a moving shape.

    Decodes and compresses like real footage, unlike the flat shapes of `render_clip` (which decode
    several times faster than anything a camera produces); benchmarks and the planner's calibration
    (data_pipeline.calibrate) measure costs on these.
    """
    coarse = rng.integers(0, 256, (height // 8 + 2, (width + frames * 2) // 8 + 2, 3)).astype(np.float32)
    tex = np.kron(coarse, np.ones((8, 8, 1), np.float32))  # blocky texture
    tex = (tex + np.roll(tex, 4, 0) + np.roll(tex, 4, 1) + np.roll(tex, (4, 4), (0, 1))) / 4  # soften
    tex += rng.normal(0, 6, tex.shape).astype(np.float32)  # grain
    tex = np.clip(tex, 0, 255).astype(np.uint8)
    shape, colour = SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(4)]
    direction = list(DIRECTIONS)[rng.integers(4)]
    dx, dy = DIRECTIONS[direction]
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        out[t] = tex[:height, 2 * t:2 * t + width]
        cy, cx = (height / 2 + dy * 2 * t) % height, (width / 2 + dx * 2 * t) % width
        out[t][_shape_mask(shape, height, width, cy, cx, height / 6)] = COLOURS[colour]
    return out, f"a {colour} {shape} moving {direction} over a textured background"


def make_synthetic_videos(out_dir: str | Path, n: int, frames: int = 24, size: int = 32, fps: float = 8,
                          seed: int = 0, *, height: int | None = None, width: int | None = None,
                          codec: str = "libx264", travel: float = 0.3, wrap: bool = False,
                          directions: Sequence[str] | None = None, room: float = 1.0) -> str:
    """Write n mp4 files + manifest.csv (key,path,caption) under out_dir; returns the manifest path.

    height/width override the square `size` (benchmarks use realistic 320x240). The shape crosses
    `travel` of the frame over the video; it stays inside the frame unless `wrap` (the old
    behaviour: uniform starts in the middle 60% of the frame, wrapping around the edges).
    `directions` (default: all four) limits the directions drawn; the default draws the same clips
    as before the option existed. `room` > 1 places each shape so that it could go on for `room`
    times its travel without touching the edge: a model that extends a clip (autoregressive
    extension) has then seen shapes with space ahead of them, never one about to hit the edge, and
    the same seed draws the same shapes, colours and directions.
    """
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    h, w = height or size, width or size
    rng = np.random.default_rng(seed)
    rows = []
    colours, directions = list(COLOURS), list(directions or DIRECTIONS)
    unknown = sorted(set(directions) - set(DIRECTIONS))
    if unknown:
        raise ValueError(f"unknown direction(s) {unknown}; choose from {list(DIRECTIONS)}")
    for i in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = colours[int(rng.integers(len(colours)))]
        direction = directions[int(rng.integers(len(directions)))]
        if wrap:
            start = (float(rng.uniform(0.2, 0.8) * h), float(rng.uniform(0.2, 0.8) * w))
        else:
            start = inside_start(rng, direction, h, w, travel, room=room)
        key = f"vid{i:06d}"
        path = out_dir / "videos" / f"{key}.mp4"
        write_video(path, render_clip(shape, colour, direction, frames, h, w, start, travel=travel), fps, codec=codec,
                    **(x264_options() if codec == "libx264" else {}))
        rows.append((key, str(path.resolve()), f"a {colour} {shape} moving {direction}"))
    return write_manifest(out_dir / "manifest.csv", rows)


# ------------------------------------------------------------------------ zooming and turning shapes
# kind -> (log of the radius's growth over the clip, turn over the clip in radians, clockwise on screen)
TRANSFORMS = {"growing": (0.8, 0.0), "shrinking": (-0.8, 0.0), "turning clockwise": (0.0, 1.0),
              "turning counterclockwise": (0.0, -1.0)}
TURNING_SHAPES = ("square", "triangle")  # a turning circle looks still
MOTION_KINDS = (*DIRECTIONS, *TRANSFORMS)  # every motion word a caption of the two generators names


def motion_caption(colour: str, shape: str, kind: str) -> str:
    """"a red square moving left" for a direction, "a red square growing" for a transform."""
    return f"a {colour} {shape} moving {kind}" if kind in DIRECTIONS else f"a {colour} {shape} {kind}"


def _turned_mask(shape: str, h: int, w: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """`_shape_mask` turned by `angle` radians about its centre (clockwise on screen, y down), drawn
    at 4x4 subpixels and kept where at least half are inside (edges that turn smoothly)."""
    sub = 4
    yy, xx = np.mgrid[0:h * sub, 0:w * sub].astype(np.float32)
    dy, dx = (yy + 0.5) / sub - 0.5 - cy, (xx + 0.5) / sub - 0.5 - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # the point in the shape's own (unturned) frame
    if shape == "square":
        inside = (np.abs(u) <= r) & (np.abs(v) <= r)
    elif shape == "circle":
        inside = u * u + v * v <= r * r
    else:
        inside = (v <= r) & (v >= -r) & (np.abs(u) <= (v + r) / 2)
    return inside.reshape(h, sub, w, sub).mean(axis=(1, 3)) >= 0.5


def render_transform_clip(shape: str, colour: str, kind: str, frames: int, height: int, width: int,
                          centre: tuple[float, float], background: int = 24) -> np.ndarray:
    """[T, H, W, 3] uint8: the shape stays at `centre` and grows, shrinks or turns as `kind` says
    (TRANSFORMS: the radius changes by exp(+-0.8) over the clip about the usual size; a turn of one
    radian, under the square's quarter-turn and the triangle's third-turn symmetry)."""
    log_growth, turn = TRANSFORMS[kind]
    r0 = shape_radius(height, width)
    out = np.full((frames, height, width, 3), background, dtype=np.uint8)
    for t in range(frames):
        a = t / max(frames - 1, 1)
        r = r0 * np.exp(log_growth * (a - 0.5))
        out[t][_turned_mask(shape, height, width, centre[0], centre[1], r, turn * a)] = COLOURS[colour]
    return out


def transform_centre(rng: np.random.Generator, height: int, width: int) -> tuple[float, float]:
    """A centre from which the largest drawn shape (a grown or turned one) stays inside the frame."""
    reach = shape_radius(height, width) * float(np.exp(0.4)) * 1.5 + 0.5  # grown radius x the diagonal
    return float(rng.uniform(reach, height - 1 - reach)), float(rng.uniform(reach, width - 1 - reach))


def make_motion_kind_videos(out_dir: str | Path, n: int, frames: int = 24, size: int = 32, fps: float = 8,
                            seed: int = 0, *, travel: float = 0.3, room: float = 1.0,
                            codec: str = "libx264") -> str:
    """Like `make_synthetic_videos`, with every motion kind drawn equally often: the four directions
    (shapes placed as `make_synthetic_videos` places them) and the four TRANSFORMS (shapes in place;
    turning ones are squares or triangles). Captions by `motion_caption`; returns the manifest path."""
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = MOTION_KINDS[int(rng.integers(len(MOTION_KINDS)))]
        shapes = TURNING_SHAPES if kind.startswith("turning") else SHAPES
        shape, colour = shapes[int(rng.integers(len(shapes)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
        if kind in DIRECTIONS:
            start = inside_start(rng, kind, size, size, travel, room=room)
            video = render_clip(shape, colour, kind, frames, size, size, start, travel=travel)
        else:
            video = render_transform_clip(shape, colour, kind, frames, size, size, transform_centre(rng, size, size))
        key = f"vid{i:06d}"
        path = out_dir / "videos" / f"{key}.mp4"
        write_video(path, video, fps, codec=codec, **(x264_options() if codec == "libx264" else {}))
        rows.append((key, str(path.resolve()), motion_caption(colour, shape, kind)))
    return write_manifest(out_dir / "manifest.csv", rows)


def main(argv: list[str] | None = None) -> None:
    default = {k: v.default for k, v in inspect.signature(make_synthetic_videos).parameters.items()}  # one source
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--frames", type=int, default=default["frames"])
    p.add_argument("--size", type=int, default=default["size"])
    p.add_argument("--height", type=int, default=default["height"])
    p.add_argument("--width", type=int, default=default["width"])
    p.add_argument("--fps", type=float, default=default["fps"])
    p.add_argument("--seed", type=int, default=default["seed"])
    p.add_argument("--travel", type=float, default=default["travel"],
                   help="share of the frame the shape crosses over the video")
    p.add_argument("--room", type=float, default=default["room"],
                   help="place shapes with space to go on for this many times the video's travel (>= 1)")
    p.add_argument("--wrap", action="store_true", help="old behaviour: shapes may leave the frame and wrap around")
    p.add_argument("--directions", default=",".join(DIRECTIONS),
                   help="comma-separated directions to draw from (default: all four)")
    p.add_argument("--transforms", action="store_true",
                   help="also shapes growing, shrinking and turning (make_motion_kind_videos; square frames)")
    a = p.parse_args(argv)
    if a.transforms:
        print(make_motion_kind_videos(a.out_dir, a.n, a.frames, a.size, a.fps, a.seed, travel=a.travel, room=a.room))
        return
    path = make_synthetic_videos(a.out_dir, a.n, a.frames, a.size, a.fps, a.seed, height=a.height, width=a.width,
                                 travel=a.travel, wrap=a.wrap, directions=a.directions.split(","), room=a.room)
    print(path)


if __name__ == "__main__":
    main()
