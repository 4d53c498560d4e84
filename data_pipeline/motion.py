"""A cheap per-clip motion score, computed at shard time and stored in each sample's `{key}.json`.

Why: video models trained on real data are hurt by static clips (slides, still photos with a
caption, a frozen camera on an empty room). A score stored with every sample lets the sharder drop
them (`filter.min_motion`) and the training loader skip them later (`data.min_motion`) by reading
only the sample's JSON, without re-sharding or decoding.

Definition (version "mad_v1"): the mean absolute difference between consecutive frames of the
clip as stored (after resize and crop, before the clip encode), over every pixel and channel,
divided by 255: 0 = every frame the same, 1 = every pixel flips between black and white every
frame. Frames repeated to pad a short clip (`clip.too_short: pad`) are left out, so padding does
not dilute the score; a clip with fewer than two real frames scores 0.
"""

from __future__ import annotations

import numpy as np

MOTION_DEFINITION = "mad_v1"  # written to index.json so a reader knows what the number means


def motion_score(frames: np.ndarray, padded: int = 0) -> float:
    """Mean |frame[t+1] - frame[t]| / 255 over uint8 [T, H, W, C] frames, padded frames excluded."""
    real = frames[: frames.shape[0] - padded] if padded else frames
    if real.shape[0] < 2:
        return 0.0
    total = 0
    for t in range(real.shape[0] - 1):  # frame by frame: no int16 copy of the whole clip
        a, b = real[t], real[t + 1]
        total += int(np.subtract(np.maximum(a, b), np.minimum(a, b)).sum(dtype=np.int64))
    return total / (255.0 * real[0].size * (real.shape[0] - 1))
