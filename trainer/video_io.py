"""Model output videos → uint8 frames → mp4 (PyAV/h264), GIF (Pillow) and TensorBoard video summaries.

TensorBoard's own `add_video` needs moviepy; a video summary is just an Image summary whose payload
is an animated GIF, so we build that directly from the same GIF bytes we save to disk.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.mp4 import DEFAULT_PRESET, write_video

OUTPUT_FPS = 8.0  # frame rate of written samples (mp4, GIF, TensorBoard) unless asked otherwise


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[C, T, H, W] in [-1, 1] → [T, H, W, 3] uint8 (grey replicated to RGB)."""
    if video.ndim != 4:
        raise ValueError(f"expected a [C,T,H,W] video, got shape {tuple(video.shape)}")
    v = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    v = v.permute(1, 2, 3, 0).numpy()  # T H W C
    if v.shape[-1] == 1:
        v = np.repeat(v, 3, axis=-1)
    return np.ascontiguousarray(v[..., :3])


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row/column when a side is odd."""
    t, h, w, _ = frames.shape
    if h % 2:
        frames = np.concatenate([frames, frames[:, -1:]], axis=1)
    if w % 2:
        frames = np.concatenate([frames, frames[:, :, -1:]], axis=2)
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = OUTPUT_FPS) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, _even(frames), fps, codec="libx264", crf="18", preset=DEFAULT_PRESET, threads="1")
    return path


def gif_bytes(frames: np.ndarray, fps: float = OUTPUT_FPS, upscale: int = 1) -> bytes:
    images = [Image.fromarray(f) for f in frames]
    if upscale > 1:
        images = [im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) for im in images]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, int(round(1000 / fps))), loop=0)
    return buf.getvalue()


def write_gif(path: str | Path, frames: np.ndarray, fps: float = OUTPUT_FPS, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gif_bytes(frames, fps, upscale))
    return path


def video_summary(tag: str, frames: np.ndarray, fps: float = OUTPUT_FPS, upscale: int = 1):
    """A TensorBoard Summary proto that the Images tab plays as an animation."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    t, h, w, _ = frames.shape
    image = Summary.Image(height=h * upscale, width=w * upscale, colorspace=3,
                          encoded_image_string=gif_bytes(frames, fps, upscale))
    return Summary(value=[Summary.Value(tag=tag, image=image)])
