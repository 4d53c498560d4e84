"""Read colour, shape and direction of motion back from the pixels of a synthetic clip.

The renderer in `data_pipeline.synthetic` knows the truth of every caption ("a red square moving
right"), so a generated clip can be scored without a learned classifier: the reader finds the shape
as the pixels far from the background, names the nearest palette colour, classifies the shape by how
much of its bounding extent it fills, and measures motion as the sum of frame-to-frame centroid
shifts. Centroids are circular means, because the renderer wraps shapes around the frame edges: a
plain mean would jump by a whole frame width at the wrap and read the wrong direction.

Shapes that stay in place and grow, shrink or turn (data_pipeline.synthetic.make_motion_kind_videos)
are read by `read_motion_kind`: growth from the shape's area over the clip, the turn from a
similarity fit (common/global_motion.py) to the shape's mask; `score_motion_kinds` scores them with
the directions.

Checked against the training clips themselves (tests/test_synthetic_reader.py): a reader that
misreads real clips would make every accuracy it reports meaningless.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from data_pipeline.synthetic import COLOURS, DIRECTIONS, MOTION_KINDS, SHAPES

BACKGROUND = 24
# a pixel counts as shape when its RGB distance from the background exceeds this; the palette's
# nearest colour is ~160 away, so anti-aliased edges at half coverage still count
FOREGROUND_DISTANCE = 60.0
CAPTION = re.compile(r"^a (\w+) (\w+) moving (\w+)$")


@dataclass(frozen=True)
class Reading:
    colour: str | None
    shape: str | None
    direction: str | None
    displacement: tuple[float, float]  # (dx, dy) in pixels over the clip, right and down positive


def parse_caption(caption: str) -> dict[str, str] | None:
    """"a red square moving right" -> {colour, shape, direction}; None for other captions."""
    m = CAPTION.match(caption.strip().lower())
    if m is None or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in DIRECTIONS:
        return None
    return {"colour": m[1], "shape": m[2], "direction": m[3]}


def _foreground(frames: np.ndarray) -> np.ndarray:
    """[T, H, W] bool: pixels that are not background."""
    dist = np.linalg.norm(frames.astype(np.float32) - BACKGROUND, axis=-1)
    return dist > FOREGROUND_DISTANCE


def _circular_centroid(mask: np.ndarray, axis: int) -> float | None:
    """Centroid of a 2D mask along `axis` on a circle of the frame's length (wrap-around aware)."""
    n = mask.shape[axis]
    weights = mask.sum(axis=1 - axis).astype(np.float64)
    if weights.sum() == 0:
        return None
    angles = 2 * np.pi * np.arange(n) / n
    c, s = (weights * np.cos(angles)).sum(), (weights * np.sin(angles)).sum()
    if np.hypot(c, s) < 1e-9:  # evenly spread: no defined centre
        return None
    return float(np.arctan2(s, c) % (2 * np.pi) * n / (2 * np.pi))


def _wrapped_delta(a: float, b: float, n: int) -> float:
    """b - a on a circle of length n, in (-n/2, n/2]."""
    d = (b - a) % n
    return d - n if d > n / 2 else d


def read_displacement(mask: np.ndarray) -> tuple[float, float]:
    """Summed centroid shift (dx, dy) over frames whose shape is visible."""
    _, h, w = mask.shape
    total = [0.0, 0.0]
    prev: tuple[float | None, float | None] = (None, None)
    for frame in mask:
        cur = (_circular_centroid(frame, 1), _circular_centroid(frame, 0))  # (x, y)
        for i, n in ((0, w), (1, h)):
            if prev[i] is not None and cur[i] is not None:
                total[i] += _wrapped_delta(prev[i], cur[i], n)
        prev = cur
    return total[0], total[1]


def direction_of(dx: float, dy: float, min_pixels: float = 1.0) -> str | None:
    """The caption word for the dominant axis and sign; None when the shape hardly moves."""
    if max(abs(dx), abs(dy)) < min_pixels:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _nearest_colour(frames: np.ndarray, mask: np.ndarray) -> str | None:
    if not mask.any():
        return None
    mean = frames[mask].astype(np.float64).mean(axis=0)
    return min(COLOURS, key=lambda name: float(np.sum((mean - COLOURS[name]) ** 2)))


def _shape_of(mask: np.ndarray) -> str | None:
    """Square, circle or triangle from two measures of the shape, medians over frames.

    The renderer's triangle points up, so most of its pixels lie in the lower half of its extent
    (asymmetry ~0.3 against ~0 for the others); a square fills its extent, a circle about pi/4 of it
    (at 16 px after resizing: >= 0.88 against 0.74-0.85). Frames where the shape is cut by the wrap
    are measured on the rolled mask so the extent is contiguous.
    """
    fills, asymmetries = [], []
    for frame in mask:
        if frame.sum() < 4:
            continue
        shape = _roll_to_centre(frame)
        ys, xs = np.nonzero(shape)
        rows = shape.sum(axis=1)[ys.min():ys.max() + 1]
        half = len(rows) // 2
        fills.append(frame.sum() / (len(rows) * (xs.max() - xs.min() + 1)))
        asymmetries.append((rows[len(rows) - half:].sum() - rows[:half].sum()) / rows.sum())
    if not fills:
        return None
    if np.median(asymmetries) > 0.18:
        return "triangle"
    return "square" if np.median(fills) >= 0.865 else "circle"


def _roll_to_centre(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape
    cx, cy = _circular_centroid(frame, 1), _circular_centroid(frame, 0)
    return np.roll(frame, (h // 2 - int(round(cy or 0)), w // 2 - int(round(cx or 0))), axis=(0, 1))


def read_clip(frames: np.ndarray) -> Reading:
    """frames uint8 [T, H, W, 3] -> what the clip shows."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got shape {frames.shape}")
    mask = _foreground(frames)
    dx, dy = read_displacement(mask)
    return Reading(_nearest_colour(frames, mask), _shape_of(mask), direction_of(dx, dy), (dx, dy))


ATTRIBUTES = ("colour", "shape", "direction")


def score(readings: list[Reading], captions: list[str]) -> dict[str, float]:
    """Accuracy per attribute, and `all` (colour and direction both right: the demo's target)."""
    hits = {a: 0 for a in (*ATTRIBUTES, "colour_and_direction", "axis")}
    n = 0
    for reading, caption in zip(readings, captions, strict=True):
        truth = parse_caption(caption)
        if truth is None:
            raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape> moving <direction>'")
        n += 1
        ok = {a: getattr(reading, a) == truth[a] for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        hits["colour_and_direction"] += ok["colour"] and ok["direction"]
        horizontal = truth["direction"] in ("left", "right")
        hits["axis"] += reading.direction is not None and (reading.direction in ("left", "right")) == horizontal
    return {k: v / max(n, 1) for k, v in hits.items()}


# ------------------------------------------------------------------------ every motion kind
MOTION_CAPTION = re.compile(r"^a (\w+) (\w+) (?:moving (\w+)|(growing|shrinking|turning (?:counter)?clockwise))$")
# a kind is read when the shape's radius changes by more than exp(+-0.25) over the clip (growing,
# shrinking; the generator's 0.8), moves more than MOVE_SHARE of the frame (a direction; 0.3), or
# turns more than TURN_RADIANS with neither (turning; 1.0, which the fit reads biased low)
GROWTH_LOG, MOVE_SHARE, TURN_RADIANS = 0.25, 0.1, 0.15


def parse_motion_caption(caption: str) -> dict[str, str] | None:
    """"a red square moving right" / "a red square growing" -> {colour, shape, motion}; None otherwise."""
    m = MOTION_CAPTION.match(caption.strip().lower())
    if m is None or m[1] not in COLOURS or m[2] not in SHAPES:
        return None
    kind = m[3] or m[4]
    return {"colour": m[1], "shape": m[2], "motion": kind} if kind in MOTION_KINDS else None


def read_motion_kind(frames: np.ndarray) -> str | None:
    """uint8 [T, H, W, 3] -> the motion kind the clip shows (a direction, "growing", "shrinking",
    "turning clockwise" or "turning counterclockwise"), or None when the shape does nothing readable."""
    import torch

    from common.global_motion import global_motion

    mask = _foreground(frames)
    t, h, w = mask.shape
    areas = mask.reshape(t, -1).sum(1).astype(np.float64)
    k = max(1, t // 4)
    if areas[:k].mean() > 0 and areas[-k:].mean() > 0:
        growth = 0.5 * np.log(areas[-k:].mean() / areas[:k].mean())  # of the radius
        if abs(growth) > GROWTH_LOG:
            return "growing" if growth > 0 else "shrinking"
    dx, dy = read_displacement(mask)
    if max(abs(dx) / w, abs(dy) / h) > MOVE_SHARE:
        return direction_of(dx, dy)
    video = torch.from_numpy(mask.astype(np.float32))[None, None]
    turn = float(global_motion(video)[0, 3])
    if abs(turn) > TURN_RADIANS:
        return "turning clockwise" if turn > 0 else "turning counterclockwise"
    return None


def score_motion_kinds(clips: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """Accuracy of the motion kind, of colour and of both, over clips whose captions name any kind
    ("motion", "colour", "colour_and_motion"), and per kind ("motion/<kind>")."""
    hits: dict[str, list[bool]] = {"motion": [], "colour": [], "colour_and_motion": []}
    for frames, caption in zip(clips, captions, strict=True):
        truth = parse_motion_caption(caption)
        if truth is None:
            raise ValueError(f"caption {caption!r} names no colour, shape and motion kind of data_pipeline.synthetic")
        motion_ok = read_motion_kind(frames) == truth["motion"]
        colour_ok = _nearest_colour(frames, _foreground(frames)) == truth["colour"]
        hits["motion"].append(motion_ok)
        hits["colour"].append(colour_ok)
        hits["colour_and_motion"].append(motion_ok and colour_ok)
        hits.setdefault(f"motion/{truth['motion']}", []).append(motion_ok)
    return {k: sum(v) / max(len(v), 1) for k, v in hits.items()}
