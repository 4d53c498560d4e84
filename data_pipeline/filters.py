"""Shard-time filters (`filter.*` in the shard config): leave out clips a video model should not
train on, each as a failure with a stable reason, counted in the shard stats like any other.

    too_short   filter.min_duration_s  the source (or, with clip spans, the span) is shorter
    too_small   filter.min_side        the source's shorter side has fewer pixels
    bad_aspect  filter.max_aspect      long side / short side, as displayed, is larger
    static_clip filter.min_motion      the clip's motion score (data_pipeline.motion) is lower

The first three need only the stream's metadata, so they run before any frame is decoded (a
filtered source costs an open, not a decode). The motion check needs the decoded clip.
"""

from __future__ import annotations

from collections.abc import Callable

from data_pipeline.config import FilterConfig
from data_pipeline.video import Clip, DecodeError, VideoInfo


class Filtered(DecodeError):
    """A source or clip left out by a `filter.*` setting: not a defect of the file, a choice."""


def source_length(info: VideoInfo, span: tuple[float, float] | None) -> float | None:
    """Seconds of the source a clip may come from: the video, or the span cut to the video's end."""
    if span is None:
        return info.duration_s
    start, end = span
    return (min(end, info.duration_s) if info.duration_s is not None else end) - start


def check_source(info: VideoInfo, f: FilterConfig, span: tuple[float, float] | None = None) -> None:
    """Raise Filtered when the source fails a metadata filter. An unknown duration passes the
    duration filter (the clip still needs its T frames, or it fails as too_short while decoding)."""
    length = source_length(info, span)
    if f.min_duration_s and length is not None and length < f.min_duration_s:
        what = "span" if span is not None else "duration"
        raise Filtered("too_short", f"{what} {length:.3f} s < filter.min_duration_s={f.min_duration_s:g}")
    short_side = min(info.width, info.height)
    if f.min_side and short_side < f.min_side:
        raise Filtered("too_small", f"{info.width}x{info.height}: shorter side {short_side} < filter.min_side={f.min_side}")
    if f.max_aspect:
        shown_w, shown_h = info.width * info.sar, float(info.height)
        aspect = max(shown_w, shown_h) / min(shown_w, shown_h)
        if aspect > f.max_aspect:
            raise Filtered("bad_aspect", f"{info.width}x{info.height} (sar {info.sar:g}): aspect {aspect:.3f} > "
                           f"filter.max_aspect={f.max_aspect:g}")


def source_check(f: FilterConfig, span: tuple[float, float] | None = None) -> Callable[[VideoInfo], None] | None:
    """The `accept` callback for video.decode_clips, or None when no metadata filter is on."""
    if not (f.min_duration_s or f.min_side or f.max_aspect):
        return None
    return lambda info: check_source(info, f, span)


def drop_static(clips: list[Clip], f: FilterConfig) -> tuple[list[Clip], list[Clip]]:
    """(moving clips, static clips) by filter.min_motion; raises Filtered("static_clip") when no
    clip of the source moves enough, so a source of static clips is one failure with its reason."""
    if not f.min_motion:
        return clips, []
    kept = [c for c in clips if c.motion >= f.min_motion]
    dropped = [c for c in clips if c.motion < f.min_motion]
    if not kept:
        scores = ", ".join(f"{c.motion:.4f}" for c in clips)
        raise Filtered("static_clip", f"motion {scores} < filter.min_motion={f.min_motion:g}")
    return kept, dropped
