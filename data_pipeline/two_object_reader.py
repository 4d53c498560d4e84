"""Read each object's direction of motion back from the pixels of a two-object clip
(`data_pipeline.two_objects`: "a red square moving left and a blue circle moving up").

The two shapes have different palette colours, so the reader splits the foreground by colour and
measures each colour's motion as `synthetic_reader` does for one shape (summed centroid shifts).
A pixel's colour is the palette colour whose line from the background explains it best, not the
nearest palette colour: an edge pixel half covered by yellow lies nearer to red than to yellow, but
exactly on the background-to-yellow line.

Checked against the training clips themselves (tests/test_two_objects.py) before any model is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline.synthetic import COLOURS
from data_pipeline.synthetic_reader import BACKGROUND, _foreground, direction_of, read_displacement
from data_pipeline.two_objects import parse_two_object_caption

_PALETTE = list(COLOURS)
_OFFSETS = np.array([COLOURS[c] for c in _PALETTE], dtype=np.float32) - BACKGROUND  # [K, 3]


def colour_labels(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, H, W] int: index into COLOURS of each pixel's colour (-1 = background):
    the palette colour c minimising |p - bg - a (c - bg)| over a in [0, 1] (coverage of a blended edge)."""
    p = frames.astype(np.float32) - BACKGROUND
    alpha = np.clip(np.einsum("thwc,kc->thwk", p, _OFFSETS) / (_OFFSETS**2).sum(1), 0.0, 1.0)
    residual = np.linalg.norm(p[..., None, :] - alpha[..., None] * _OFFSETS, axis=-1)  # [T, H, W, K]
    labels = residual.argmin(-1)
    return np.where(_foreground(frames), labels, -1)


@dataclass(frozen=True)
class ObjectReading:
    colour: str
    pixels: int  # foreground pixels of this colour over the clip
    direction: str | None
    displacement: tuple[float, float]  # (dx, dy) pixels over the clip, right and down positive


def read_objects(frames: np.ndarray, colours: list[str]) -> dict[str, ObjectReading]:
    """frames uint8 [T, H, W, 3] -> the motion of each of `colours` (a colour not drawn reads direction None)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got shape {frames.shape}")
    labels = colour_labels(frames)
    out = {}
    for colour in colours:
        mask = labels == _PALETTE.index(colour)
        dx, dy = read_displacement(mask)
        out[colour] = ObjectReading(colour, int(mask.sum()), direction_of(dx, dy), (dx, dy))
    return out


def score_two_objects(clips: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """Share of captioned objects drawn moving their captioned direction (`object_direction`, the task's
    metric), of clips with both right (`both_directions`), and of objects whose colour is drawn at all."""
    hits = {"object_direction": 0, "both_directions": 0, "object_present": 0}
    for clip, caption in zip(clips, captions, strict=True):
        objects = parse_two_object_caption(caption)
        if objects is None:
            raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape> moving <direction> and "
                             f"a <colour> <shape> moving <direction>'")
        readings = read_objects(clip, [o["colour"] for o in objects])
        right = [readings[o["colour"]].direction == o["direction"] for o in objects]
        hits["object_direction"] += sum(right)
        hits["both_directions"] += all(right)
        hits["object_present"] += sum(readings[o["colour"]].pixels > 0 for o in objects)
    n = max(len(captions), 1)
    return {"object_direction": hits["object_direction"] / (2 * n), "both_directions": hits["both_directions"] / n,
            "object_present": hits["object_present"] / (2 * n)}
