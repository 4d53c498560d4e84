"""A clip's global motion (pan x/y, zoom, rotation: common/global_motion.py) measured when the shards
are made, on the full decoded frame, and stored in the clip's `{key}.json` as "global_motion".

Why here and not in the trainer: the motion is a property of the data (Stable Video Diffusion computes
its motion bucket when the data is prepared), measuring it once saves the work on every training step,
and the full frame shows what the resized, centre-cropped training clip may cut away (content that
leaves the crop, a zoom's outer ring). The frame is area-averaged by FFmpeg to `MOTION_WORK_SIZE` on its
short side first: the closed-form fit is linear only for motion of about a pixel per frame, and a
camera pan crosses many pixels per frame at full resolution. Pan is in units of the short side, which
is the training clip's side for the square clips the configs use.
"""

from __future__ import annotations

import av
import av.video.reformatter
import numpy as np
import torch

from common.global_motion import global_motion

MOTION_WORK_SIZE = 64  # short side (px) of the grey frames the motion is fitted on


class FullFrameMotion:
    """Picked source frames -> the clip's global motion, on grey frames of the whole picture in display
    orientation. One reformatter per stream, reused (a fresh scaler per frame is ~10x slower)."""

    def __init__(self, rotation: int, sar: float, work_size: int = MOTION_WORK_SIZE):
        self.rotation, self.sar, self.work_size = rotation, sar, work_size
        self.reformatter = av.video.reformatter.VideoReformatter()

    def _size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) of the coded frame scaled so that the displayed short side is work_size
        (never enlarged)."""
        dw, dh = w * self.sar, float(h)
        scale = min(1.0, self.work_size / min(dw, dh))
        return max(3, round(dw * scale)), max(3, round(dh * scale))

    def grey(self, frame: av.VideoFrame) -> np.ndarray:
        w, h = self._size(frame.width, frame.height)
        out = self.reformatter.reformat(frame, width=w, height=h, format="gray", interpolation="AREA",
                                        threads=1).to_ndarray()[:, :w]  # rows may be padded to an aligned width
        return np.rot90(out, k=self.rotation // 90) if self.rotation else out

    def __call__(self, picked: list) -> list[float]:
        """[(time, frame)] of one clip (real frames only, no padding) -> [pan_x, pan_y, zoom, rotation]."""
        cache: dict[int, np.ndarray] = {}
        frames = []
        for _t, frame in picked:
            if id(frame) not in cache:
                cache[id(frame)] = self.grey(frame)
            frames.append(cache[id(frame)])
        video = torch.from_numpy(np.stack(frames).astype(np.float32) / 127.5 - 1)[None, None]  # [1, 1, T, H, W]
        return [round(float(v), 6) for v in global_motion(video)[0]]
