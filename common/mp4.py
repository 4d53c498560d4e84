"""uint8 frames → small h264 mp4 bytes, deterministically.

Shards must be byte-identical whether made by local workers or a SLURM array, so the encode pins
everything that could vary between runs: single-threaded x264 without a lookahead thread and
without mb-tree rate control (with it, one clip's bytes differed between processes under load), the
RGB → YUV conversion done by our own single-threaded swscale context (not the encoder's implicit,
auto-threaded one), fixed CRF/preset/GOP, and FFmpeg's `bitexact` flags (no library version
string, no timestamps in the container).
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import av.video.reformatter
import numpy as np

DEFAULT_CRF = 20
DEFAULT_PRESET = "veryfast"


def x264_options(crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET, **extra: str) -> dict[str, str]:
    """libx264 options that make an encode reproducible: one thread, no lookahead thread, no mb-tree
    rate control (see the module doc); `extra` (e.g. the GOP `g`) goes before the pinned ones."""
    return {"crf": str(crf), "preset": preset, **extra, "threads": "1", "x264-params": "sync-lookahead=0:mbtree=0"}


def _rational_fps(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def _mux_frames(out, stream, frames: np.ndarray) -> None:
    """RGB frames → the stream's pixel format with one single-threaded converter → encode → mux."""
    converter = av.video.reformatter.VideoReformatter()
    for i in range(frames.shape[0]):
        frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
        frame = converter.reformat(frame, format=stream.pix_fmt, threads=1)
        frame.pts = i
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def encode_mp4(frames: np.ndarray, fps: float, *, codec: str = "libx264", crf: int = DEFAULT_CRF,
               preset: str = DEFAULT_PRESET, pix_fmt: str = "yuv420p") -> bytes:
    """[T, H, W, 3] uint8 RGB → mp4 bytes. H and W must be even for yuv420p."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T,H,W,3] uint8, got {frames.shape}")
    t, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        out.flags |= av.container.Flags.bitexact.value
        stream = out.add_stream(codec, rate=_rational_fps(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = x264_options(crf, preset, g=str(max(t, 1)))
        _mux_frames(out, stream, frames)
    return buf.getvalue()


def write_video(path: str | Path, frames: np.ndarray, fps: float, *, codec: str = "libx264",
                container: str | None = None, pix_fmt: str = "yuv420p", **stream_options: str) -> None:
    """Write frames to a file with any PyAV-encodable codec/container (fixtures for many formats)."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    t, h, w, _ = frames.shape
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=_rational_fps(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.codec_context.thread_count = 1
        if stream_options:
            stream.options = dict(stream_options)
        _mux_frames(out, stream, frames)
