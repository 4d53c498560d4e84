"""Video file or bytes → up to `clips_per_video` clips of T frames, resized + center-cropped to HxW.

Decoding is the cost floor of sharding, so this module only decodes what a clip needs: it seeks
to each clip's start (landing on the keyframe before it), stops as soon as the clip is full, and
converts only the frames it keeps. Resizing goes through ONE `VideoReformatter` per stream (a
per-frame `to_ndarray(width=, height=)` builds a new swscale context each time, ~10x slower).
Frames are picked by timestamp (nearest frame to each target time), so variable-frame-rate
sources give evenly timed clips. Every refusal is a DecodeError with a stable reason.
"""

from __future__ import annotations

import bisect
import functools
import io
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
import av.video.reformatter
import numpy as np

from data_pipeline.clip_motion import FullFrameMotion
from data_pipeline.config import ClipConfig
from data_pipeline.motion import motion_score

_MAX_BAD_PACKETS = 50  # consecutive undecodable packets before we call the file corrupt
# Where skip_frame=NONREF is safe to use: codecs whose decoders honour it per packet, in containers
# that store real presentation timestamps (AVI stores decode order only; MPEG-4 part 2 packs B-frames).
_DISCARD_CODECS = {"h264", "hevc"}
_DISCARD_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpegts"}
# Packets demuxed ahead of the decoder; more than h264/hevc's deepest frame reordering (16), so the
# display-order neighbours of a packet's frame are known before it is decoded.
_LOOKAHEAD_PACKETS = 48


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float | None
    duration_s: float | None
    codec: str
    container: str
    rotation: int = 0  # degrees counter-clockwise applied to display the video
    sar: float = 1.0  # sample (pixel) aspect ratio: display width = width * sar
    frames_decoded: int = 0  # frames the decoder produced (discarded non-reference frames excluded)


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    index: int
    start_s: float
    fps: float  # frame rate of the clip as stored
    padded: int = 0  # trailing frames repeated to reach T (too_short: pad)
    times: list[float] = field(default_factory=list)  # source timestamps of the kept frames
    # [pan_x, pan_y, zoom, rotation] on the full source frame (data_pipeline.clip_motion); None = not measured
    global_motion: list[float] | None = None

    @functools.cached_property
    def motion(self) -> float:
        """Motion score of the clip as stored (data_pipeline.motion; 0 = static); computed once."""
        return motion_score(self.frames, self.padded)


def _parse_rotation_tag(metadata: dict) -> int | None:
    """Legacy `rotate` tag (clockwise degrees) → counter-clockwise degrees; raises on nonsense."""
    for k, v in metadata.items():
        if k.lower() == "rotate":
            try:
                angle = float(v)
            except (TypeError, ValueError):
                raise DecodeError("bad_rotation", f"rotate tag {v!r} is not a number") from None
            return _normalise_rotation(-angle)
    return None


def _normalise_rotation(angle: float) -> int:
    if not math.isfinite(angle):
        raise DecodeError("bad_rotation", f"rotation {angle} is not finite")
    quarter = round(angle / 90.0)
    if abs(angle - 90.0 * quarter) > 1.0:
        raise DecodeError("bad_rotation", f"rotation {angle:g} degrees is not a multiple of 90")
    return int(quarter % 4) * 90


class _FrameConverter:
    """Frame → uint8 [H, W, 3] in display orientation: resize short side, rotate, center crop."""

    def __init__(self, height: int, width: int, rotation: int, sar: float):
        self.height, self.width, self.rotation, self.sar = height, width, rotation, sar
        self.reformatter = av.video.reformatter.VideoReformatter()
        self._geometry: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    def _plan(self, w: int, h: int) -> tuple[int, int, int, int]:
        """(coded width, coded height) to scale to, and (display width, display height) after rotation."""
        dw, dh = w * self.sar, float(h)
        if self.rotation in (90, 270):
            dw, dh = dh, dw
        scale = max(self.width / dw, self.height / dh)
        nw, nh = max(self.width, round(dw * scale)), max(self.height, round(dh * scale))
        cw, ch = (nh, nw) if self.rotation in (90, 270) else (nw, nh)
        return cw, ch, nw, nh

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        key = (frame.width, frame.height)
        if key not in self._geometry:
            self._geometry[key] = self._plan(*key)
        cw, ch, nw, nh = self._geometry[key]
        rgb = self.reformatter.reformat(frame, width=cw, height=ch, format="rgb24", interpolation="AREA",
                                        threads=1)
        arr = rgb.to_ndarray()
        if self.rotation:
            arr = np.rot90(arr, k=self.rotation // 90)
        y0, x0 = (nh - self.height) // 2, (nw - self.width) // 2
        return np.ascontiguousarray(arr[y0:y0 + self.height, x0:x0 + self.width])


def _open(src: str | bytes):
    try:
        return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src, mode="r",
                       metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise DecodeError("unreadable_container", f"{type(e).__name__}: {e}") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DecodeError("unreadable_container", str(e)) from None


def decode_clips(src: str | bytes, cfg: ClipConfig, decode_threads: int = 1, *,
                 discard_unneeded: bool = True, span: tuple[float, float] | None = None,
                 accept: Callable[[VideoInfo], None] | None = None) -> tuple[VideoInfo, list[Clip]]:
    """Decode the clips of one video (path or bytes). Raises DecodeError with a reason.

    span=(start, end) seconds: the clips come only from [start, end): the decoder seeks to the
    keyframe before `start` (never decodes from the file's start to get there) and no picked frame
    lies at or after `end`. A span outside the video fails as `span_out_of_range`.

    discard_unneeded=False decodes every frame; the clips are the same either way (tested), only
    slower: it exists to prove that.

    accept(info) is called with the stream's metadata before any frame is decoded and may raise a
    DecodeError (data_pipeline.filters: too small, odd aspect, too short), so filtered sources cost
    an open, not a decode.
    """
    container = _open(src)
    try:
        return _decode(container, cfg, decode_threads, discard_unneeded, span, accept)
    except av.error.FFmpegError as e:
        raise DecodeError("decode_error", f"{type(e).__name__}: {e}") from None
    finally:
        container.close()


@dataclass
class _Stream:
    """What `_decode` needs to know about the video stream before decoding a frame."""

    stream: Any
    info: VideoInfo
    t0: float  # the stream's start time (s); frame times are measured from it
    tag_rotation: int | None  # from the container's metadata; None = read it from the first frame


def _probe_stream(container, cfg: ClipConfig, decode_threads: int) -> _Stream:
    """The first video stream's size, rate, duration and orientation; the container-level refusals
    (no video, no size, too large, too long) happen here, before any decoding."""
    if not container.streams.video:
        raise DecodeError("no_video_stream", f"streams: {[s.type for s in container.streams]}")
    stream = container.streams.video[0]
    cc = stream.codec_context
    w, h = int(cc.width or 0), int(cc.height or 0)
    if w <= 0 or h <= 0:
        raise DecodeError("unreadable_container", f"video stream has no size ({w}x{h})")
    if max(w, h) > cfg.max_side:
        raise DecodeError("resolution_too_large", f"{w}x{h} > clip.max_side={cfg.max_side}")
    tag_rotation = _parse_rotation_tag(dict(stream.metadata))
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    src_fps = float(rate) if rate and float(rate) > 0 else None
    tb = float(stream.time_base) if stream.time_base else None
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None and tb else 0.0
    if stream.duration and tb:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1e6
    else:
        duration = None
    if duration is not None and duration > cfg.max_duration_s:
        raise DecodeError("too_long", f"{duration:.0f}s > clip.max_duration_s={cfg.max_duration_s:g}")
    sar = float(stream.sample_aspect_ratio) if stream.sample_aspect_ratio else 1.0
    sar = sar if 0.1 < sar < 10 else 1.0
    info = VideoInfo(width=w, height=h, fps=src_fps, duration_s=duration, codec=cc.name,
                     container=container.format.name, rotation=tag_rotation or 0, sar=sar)
    stream.thread_type = "AUTO"
    stream.thread_count = max(0, int(decode_threads))
    return _Stream(stream, info, t0, tag_rotation)


def _clip_timing(cfg: ClipConfig, src_fps: float | None) -> tuple[float, float]:
    """(frame rate of the stored clip, seconds one clip covers): by stride over the source's frames,
    or at a fixed output rate."""
    if cfg.stride is not None:
        return (src_fps or 25.0) / cfg.stride, cfg.frames * cfg.stride / (src_fps or 25.0)
    return float(cfg.fps), cfg.frames / float(cfg.fps)


def _span_bounds(clip_range: tuple[float, float] | None, info: VideoInfo) -> tuple[float, float]:
    """[lo, hi) seconds the clips may use: the row's span (checked against the video's duration), or
    the whole video."""
    if clip_range is None:
        return 0.0, math.inf
    lo, hi = clip_range
    one_frame = 1.0 / (info.fps or 25.0)
    if info.duration_s is not None and (lo >= info.duration_s or hi > info.duration_s + max(0.05, one_frame)):
        raise DecodeError("span_out_of_range", f"span [{lo:g}, {hi:g}) s outside the video's {info.duration_s:.3f} s")
    return lo, hi


def _clip_starts(cfg: ClipConfig, lo: float, available_s: float | None, clip_len: float) -> list[float]:
    """Start times of the clips: one at `lo`, or `clips_per_video` spread evenly over what is available."""
    n = 1
    if available_s is not None and cfg.clips_per_video > 1:
        n = max(1, min(cfg.clips_per_video, int(available_s // clip_len)))
    return [lo] if n == 1 else [lo + i * (available_s - clip_len) / (n - 1) for i in range(n)]


def _converted(picked: list, converter: _FrameConverter) -> list[np.ndarray]:
    """The picked frames resized; a source frame picked twice (low source fps) is converted once."""
    cache: dict[int, np.ndarray] = {}
    frames = []
    for _t, frame in picked:
        if id(frame) not in cache:
            cache[id(frame)] = converter(frame)
        frames.append(cache[id(frame)])
    return frames


def _decode(container, cfg: ClipConfig, decode_threads: int, discard_unneeded: bool = True,
            clip_range: tuple[float, float] | None = None, accept: Callable[[VideoInfo], None] | None = None
            ) -> tuple[VideoInfo, list[Clip]]:
    probed = _probe_stream(container, cfg, decode_threads)
    info, stream = probed.info, probed.stream
    out_fps, clip_len = _clip_timing(cfg, info.fps)
    lo, hi = _span_bounds(clip_range, info)
    if accept is not None:  # after the span check: a span outside the video says so, not "too short"
        accept(info)
    starts = _clip_starts(cfg, lo, (hi - lo) if clip_range is not None else info.duration_s, clip_len)

    # Every target time of every clip (fps mode): frames no target can pick need not be decoded.
    # Stride mode counts decoded frames, so there every frame is decoded.
    discard = (discard_unneeded and cfg.stride is None and info.codec in _DISCARD_CODECS
               and info.container in _DISCARD_CONTAINERS)
    targets = [t for start in starts for t in _targets(start, cfg, hi)] if discard else None
    reader = _FrameReader(container, stream, probed.t0, info.fps, targets)
    converter: _FrameConverter | None = None
    full_frame_motion: FullFrameMotion | None = None
    clips: list[Clip] = []
    for ci, start in enumerate(starts):
        # far ahead: seeking beats decoding the gap; a span is always reached by seeking
        if start > reader.position + (1.0 if clip_range is None or ci > 0 else 0.0):
            reader.seek(start)
        picked = (_pick_by_stride(reader, start, cfg, hi) if cfg.stride is not None
                  else _pick_by_time(reader, start, cfg, hi))
        if not picked:
            if ci == 0:
                if clip_range is not None and info.duration_s is None:
                    raise DecodeError("span_out_of_range", f"no frame in span [{lo:g}, {hi:g}) s")
                raise reader.failure("no_frames", "no decodable frame at the clip start")
            break
        if converter is None:
            rotation = _frame_rotation(picked[0][1]) if probed.tag_rotation is None else probed.tag_rotation
            info.rotation = rotation
            converter = _FrameConverter(cfg.height, cfg.width, rotation, info.sar)
            full_frame_motion = FullFrameMotion(rotation, info.sar)
        frames = _converted(picked, converter)
        padded = cfg.frames - len(frames)
        if padded:
            if ci > 0:
                break
            if cfg.too_short == "skip" or not frames:
                where = f"span [{lo:g}, {hi:g}) s" if clip_range is not None else \
                    f"duration {info.duration_s if info.duration_s is None else round(info.duration_s, 3)}s"
                raise reader.failure("too_short", f"{len(frames)} of {cfg.frames} frames ({where})")
            frames += [frames[-1]] * padded
        clips.append(Clip(frames=np.stack(frames), index=ci, start_s=round(start, 6), fps=out_fps,
                          padded=padded, times=[round(t, 6) for t, _ in picked],
                          global_motion=full_frame_motion(picked)))
    info.frames_decoded = reader.frames_decoded
    return info, clips


def _frame_rotation(frame: av.VideoFrame) -> int:
    try:
        angle = frame.rotation
    except Exception as e:  # a malformed display matrix
        raise DecodeError("bad_rotation", f"display matrix unreadable: {e}") from None
    return _normalise_rotation(float(angle or 0))


class _FrameReader:
    """Sequential decoded frames with their times (seconds from stream start); tolerant of bad packets.

    With `targets` (every clip's target times) it also tells the decoder to drop frames no target
    can pick: a non-keyframe packet whose frame has display-order neighbours p < t < n (known from
    the packets demuxed ahead) is picked only by targets in [(p+t)/2, (t+n)/2), the nearest-frame
    rule of `_pick_by_time`; with none there, the packet is decoded with skip_frame=NONREF, which
    drops it if no other frame references it (B-frames, typically half of an h264 stream) and
    decodes it normally otherwise. Dropping frames that are never picked changes no pick, so the
    clips are identical to decoding everything.
    """

    def __init__(self, container, stream, t0: float, src_fps: float | None, targets: list[float] | None = None):
        self.container, self.stream, self.t0 = container, stream, t0
        self.frame_dur = 1.0 / src_fps if src_fps else 0.04
        self.position = 0.0  # time of the last frame handed out
        self.bad_packets = 0
        self.errors: list[str] = []
        self.frames_decoded = 0
        self.targets = sorted(targets) if targets else None
        self._known: list[float] = []  # display times of the packets demuxed since the last seek, sorted
        self._count = 0
        self._iter = self._frames()
        self._pushback: list[tuple[float, av.VideoFrame]] = []

    def _packet_time(self, packet) -> float | None:
        if packet.pts is None or packet.time_base is None:
            return None
        return float(packet.pts * packet.time_base) - self.t0

    def _unneeded(self, packet) -> bool:
        if self.targets is None or packet.is_keyframe:
            return False
        t = self._packet_time(packet)
        if t is None:
            return False
        known = self._known
        i = bisect.bisect_left(known, t)
        if i == 0 or i + 1 >= len(known) or known[i] != t or known[i - 1] == t or known[i + 1] == t:
            return False  # a neighbour not demuxed yet, or duplicate timestamps: keep it
        lo = (known[i - 1] + t) / 2 - 1e-6  # the margins only ever keep more frames
        hi = (t + known[i + 1]) / 2 + 1e-6
        j = bisect.bisect_left(self.targets, lo)
        return not (j < len(self.targets) and self.targets[j] <= hi)

    def _packets(self):
        """Demuxed packets, read _LOOKAHEAD_PACKETS ahead; a demux error surfaces only where the
        decoder reaches it, as it would without the lookahead."""
        demux = self.container.demux(self.stream)
        if self.targets is None:  # nothing will be dropped: no lookahead needed
            yield from demux
            return
        ahead: deque = deque()
        error: Exception | None = None
        ended = False
        while True:
            while not ended and len(ahead) < _LOOKAHEAD_PACKETS:
                try:
                    packet = next(demux)
                except StopIteration:
                    ended = True
                    break
                except av.error.FFmpegError as e:
                    error, ended = e, True
                    break
                ahead.append(packet)
                t = self._packet_time(packet)
                if t is not None:
                    bisect.insort(self._known, t)
            if not ahead:
                if error is not None:
                    raise error
                return
            yield ahead.popleft()

    def _frames(self):
        consecutive_bad = 0
        codec = self.stream.codec_context
        skipping = None
        for packet in self._packets():
            unneeded = self._unneeded(packet)
            if unneeded is not skipping:
                codec.skip_frame = "NONREF" if unneeded else "DEFAULT"
                skipping = unneeded
            try:
                decoded = packet.decode()
                consecutive_bad = 0
            except av.error.FFmpegError as e:  # corrupt packet: skip it, give up after many
                self.bad_packets += 1
                consecutive_bad += 1
                self.errors.append(str(e))
                if consecutive_bad > _MAX_BAD_PACKETS:
                    return
                continue
            self.frames_decoded += len(decoded)
            yield from decoded

    def seek(self, start: float) -> None:
        try:
            self.container.seek(int((start + self.t0) / float(self.stream.time_base)), stream=self.stream,
                                backward=True, any_frame=False)
        except av.error.FFmpegError:
            return  # keep decoding sequentially from where we are
        self._known = []
        self._iter = self._frames()
        self._pushback.clear()

    def next(self) -> tuple[float, av.VideoFrame] | None:
        if self._pushback:
            return self._pushback.pop()
        frame = next(self._iter, None)
        if frame is None:
            return None
        t = frame.time
        t = (t - self.t0) if t is not None else self._count * self.frame_dur
        self._count += 1
        self.position = t
        return t, frame

    def push(self, item: tuple[float, av.VideoFrame]) -> None:
        self._pushback.append(item)

    def failure(self, reason: str, detail: str) -> DecodeError:
        if self.bad_packets and reason in ("no_frames", "too_short"):
            return DecodeError("decode_error", f"{detail}; {self.bad_packets} undecodable packets, "
                               f"last: {self.errors[-1][:200]}")
        return DecodeError(reason, detail)


def _targets(start: float, cfg: ClipConfig, end: float = math.inf) -> list[float]:
    """The clip's frame times start + k/fps, k < T, that lie before `end` (a span's end)."""
    return [t for t in (start + k / cfg.fps for k in range(cfg.frames)) if t < end]


def _pick_by_time(reader: _FrameReader, start: float, cfg: ClipConfig, end: float = math.inf
                  ) -> list[tuple[float, av.VideoFrame]]:
    """Nearest source frame to each target time start + k/fps (sample-and-hold across VFR gaps)."""
    targets = _targets(start, cfg, end)
    picked: list[tuple[float, av.VideoFrame]] = []
    prev: tuple[float, av.VideoFrame] | None = None
    while len(picked) < len(targets):
        item = reader.next()
        if item is None:  # end of stream: the last frame covers one frame duration after it
            while prev is not None and len(picked) < len(targets) and \
                    targets[len(picked)] <= prev[0] + reader.frame_dur * 0.999:
                picked.append(prev)
            break
        if prev is not None:
            mid = (prev[0] + item[0]) / 2
            while len(picked) < len(targets) and targets[len(picked)] < mid:
                picked.append(prev)
        prev = item
    if prev is not None and len(picked) == len(targets):
        reader.push(prev)  # the next clip may start at this very frame
    return picked


def _pick_by_stride(reader: _FrameReader, start: float, cfg: ClipConfig, end: float = math.inf
                    ) -> list[tuple[float, av.VideoFrame]]:
    """Every stride-th decoded frame from the first one at or after `start` (and before `end`)."""
    picked: list[tuple[float, av.VideoFrame]] = []
    eps = reader.frame_dur / 2
    i = 0
    while len(picked) < cfg.frames:
        item = reader.next()
        if item is None:
            break
        if item[0] < start - eps:
            continue
        if item[0] >= end:
            break
        if i % cfg.stride == 0:
            picked.append(item)
        i += 1
    return picked
