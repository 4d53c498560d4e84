"""Clip decoding with the real PyAV decoder: codecs/containers, geometry, timing, rotation, refusals."""

from __future__ import annotations

import av
import numpy as np
import pytest
from shard_helpers import (
    frames,
    make_bad_files,
    make_h264,
    make_rotate_tag_mkv,
    make_rotated_mp4,
    make_vfr_mp4,
)

from common.mp4 import write_video
from data_pipeline.config import ClipConfig
from data_pipeline.video import DecodeError, decode_clips


def clip_cfg(**kw) -> ClipConfig:
    base = dict(frames=8, fps=8.0, height=16, width=16)
    base.update(kw)
    return ClipConfig(**base)


@pytest.mark.parametrize("codec,container,suffix,pix_fmt", [
    ("mpeg4", "avi", "avi", "yuv420p"),
    ("mjpeg", "avi", "avi", "yuvj420p"),
    ("libvpx-vp9", "webm", "webm", "yuv420p"),
    ("mpeg2video", "mpeg", "mpg", "yuv420p"),
    ("msmpeg4", "avi", "avi", "yuv420p"),
    ("libx264", "matroska", "mkv", "yuv420p"),
])
def test_many_codecs_and_containers_decode(tmp_path, codec, container, suffix, pix_fmt):
    path = tmp_path / f"v.{suffix}"
    src = frames(12, 32, 32)
    write_video(path, src, 8, codec=codec, container=container, pix_fmt=pix_fmt)
    info, clips = decode_clips(str(path), clip_cfg(height=32, width=32))
    assert len(clips) == 1 and clips[0].frames.shape == (8, 32, 32, 3) and clips[0].frames.dtype == np.uint8
    # same picture as the source (lossy codecs: mean abs error small)
    err = np.abs(clips[0].frames.astype(int) - src[:8].astype(int)).mean()
    assert err < 12, (codec, err)
    assert info.codec and info.width == 32


def test_bytes_input_equals_path_input(tmp_path):
    path = make_h264(tmp_path / "a.mp4")
    _, a = decode_clips(str(path), clip_cfg())
    _, b = decode_clips(path.read_bytes(), clip_cfg())
    assert np.array_equal(a[0].frames, b[0].frames)


def test_odd_size_resize_short_side_and_center_crop(tmp_path):
    # 214x160 in three vertical stripes (red | green | blue, ~71 px each). Short side 160 → 16 scales
    # by 0.1, so the width becomes ~21 and the 16-px center crop cuts ~2.5 px off each side: the
    # stripes keep their proportions (~7 px each), i.e. no stretching, and the crop is centered.
    img = np.zeros((160, 214, 3), np.uint8)
    img[:, :71] = (255, 0, 0)
    img[:, 71:143] = (0, 255, 0)
    img[:, 143:] = (0, 0, 255)
    write_video(tmp_path / "odd.avi", np.stack([img] * 10), 8, codec="mpeg4", container="avi",
                qscale="2")
    info, clips = decode_clips(str(tmp_path / "odd.avi"), clip_cfg(height=16, width=16))
    assert (info.width, info.height) == (214, 160)
    row = clips[0].frames[0, 8].astype(int)
    channel = row.argmax(-1)
    assert channel[0] == 0 and channel[8] == 1 and channel[15] == 2
    green = int((row[:, 1] > 200).sum())
    assert 6 <= green <= 8, green  # 71 px * 0.1 ≈ 7 (a stretch to 16 px would give ~5)
    assert abs(int((row[:, 0] > 200).sum()) - int((row[:, 2] > 200).sum())) <= 1  # centered


def test_rotation_display_matrix_is_applied(tmp_path):
    # marker top-left in coded 48x32 frame; rotated 90° counter-clockwise → bottom-left, portrait
    path = make_rotated_mp4(tmp_path / "r.mp4", 90)
    info, clips = decode_clips(str(path), clip_cfg(height=24, width=16))
    assert info.rotation == 90
    f = clips[0].frames[0].mean(-1)
    assert f[-4:, :4].mean() > 150 and f[:4, :4].mean() < 60


def test_unreadable_and_unsupported_rotation_are_reasons(tmp_path):
    with pytest.raises(DecodeError) as e:
        decode_clips(str(make_rotate_tag_mkv(tmp_path / "a.mkv", "sideways")), clip_cfg())
    assert e.value.reason == "bad_rotation"
    with pytest.raises(DecodeError) as e:
        decode_clips(str(make_rotated_mp4(tmp_path / "b.mp4", 45)), clip_cfg())
    assert e.value.reason == "bad_rotation"
    info, _ = decode_clips(str(make_rotate_tag_mkv(tmp_path / "c.mkv", "90")), clip_cfg())
    assert info.rotation == 270  # legacy tag is clockwise


def test_variable_frame_rate_picks_nearest_frame_per_target_time(tmp_path):
    times = [0, 0.1, 0.15, 0.5, 0.9, 1.0, 1.05, 1.6]
    path = make_vfr_mp4(tmp_path / "vfr.mp4", times)
    _, clips = decode_clips(str(path), clip_cfg(fps=5.0))
    # targets 0, .2, .4, ... 1.4 s → nearest stamped frames
    assert clips[0].times == [0.0, 0.15, 0.5, 0.5, 0.9, 1.0, 1.05, 1.6]
    grey = clips[0].frames[:, 8, 8, 0].astype(int)
    assert np.all(np.abs(grey - np.array([0, 20, 30, 30, 40, 50, 60, 70])) < 8)


@pytest.mark.parametrize("container,fps,clip,threads", [
    ("mp4", 24, dict(fps=8.0), 1),
    ("mp4", 24, dict(fps=8.0), 2),  # frame-threaded decoding takes skip_frame per packet too
    ("mp4", 30000 / 1001, dict(fps=10.0, clips_per_video=3), 1),
    ("matroska", 25, dict(fps=5.0, frames=6, too_short="pad"), 1),
    ("mp4", 24, dict(fps=24.0), 1),  # every frame is wanted: nothing may be dropped
])
def test_dropping_unneeded_frames_gives_the_same_clips(tmp_path, container, fps, clip, threads):
    """B-frame h264 (x264's default preset): frames no target picks are not decoded, the clips are
    bitwise those of decoding every frame."""
    path = tmp_path / "v.bin"
    src = np.concatenate([frames(40, 48, 64, seed=i) for i in range(3)])  # 120 frames, 3 scenes
    write_video(path, src, fps, codec="libx264", container=container, preset="medium")
    cfg = clip_cfg(height=32, width=32, **clip)
    info_all, every = decode_clips(str(path), cfg, threads, discard_unneeded=False)
    info, fewer = decode_clips(str(path), cfg, threads)
    assert len(every) == len(fewer) == cfg.clips_per_video
    for a, b in zip(every, fewer):
        assert np.array_equal(a.frames, b.frames) and a.times == b.times and a.start_s == b.start_s
    if clip["fps"] < fps:
        assert info.frames_decoded < 0.8 * info_all.frames_decoded, (info.frames_decoded, info_all.frames_decoded)
    else:
        assert info.frames_decoded == info_all.frames_decoded


def test_stride_and_multiple_clips_seek_to_their_start(tmp_path):
    path = make_h264(tmp_path / "long.mp4", t=80, fps=8, g="8")  # 10 s, keyframe every second
    _, clips = decode_clips(str(path), clip_cfg(frames=8, fps=None, stride=2, clips_per_video=3))
    assert [c.index for c in clips] == [0, 1, 2]
    assert [c.start_s for c in clips] == [0.0, 4.0, 8.0]  # span 2 s spread over 10 s
    for c in clips:
        assert c.times[0] == pytest.approx(c.start_s, abs=0.07)
        assert np.allclose(np.diff(c.times), 0.25, atol=1e-3)  # every 2nd frame of 8 fps
        assert c.fps == 4.0


def test_too_short_skip_or_pad(tmp_path):
    path = make_h264(tmp_path / "short.mp4", t=5)
    with pytest.raises(DecodeError) as e:
        decode_clips(str(path), clip_cfg(too_short="skip"))
    assert e.value.reason == "too_short"
    _, clips = decode_clips(str(path), clip_cfg(too_short="pad"))
    assert clips[0].padded == 3 and clips[0].frames.shape[0] == 8
    assert np.array_equal(clips[0].frames[-1], clips[0].frames[4])


def test_bad_files_get_their_reason(tmp_path):
    from data_pipeline.config import FetchConfig
    from data_pipeline.fetch import FetchError, fetch

    for expected, path in make_bad_files(tmp_path).items():
        with pytest.raises((DecodeError, FetchError)) as e:
            fetched = fetch(str(path), FetchConfig())
            decode_clips(fetched.path, clip_cfg())
        assert e.value.reason == expected.replace("_text", ""), (expected, e.value)


def test_truncated_streamable_file_is_too_short(tmp_path):
    # Matroska needs no index at the end: a cut file opens, decodes its first part, then ends early
    noise = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)  # incompressible
    write_video(tmp_path / "t.mkv", noise, 8, codec="libx264", container="matroska")
    data = (tmp_path / "t.mkv").read_bytes()
    with av.open(str(tmp_path / "t.mkv")) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[12]
    # cut in the middle of the 13th packet: the demuxer drops the partial block, so the 12 whole
    # packets decode to 12 frames and nothing is undecodable (that would be decode_error)
    with pytest.raises(DecodeError) as e:
        decode_clips(data[: pos + size // 2], clip_cfg(frames=32))
    assert e.value.reason == "too_short"
    assert e.value.detail.startswith("12 of 32 frames"), e.value.detail


def test_file_cut_after_the_clip_still_gives_the_clip(tmp_path):
    """Packets are demuxed ahead of the decoder; a cut past the clip's end must not fail the clip."""
    noise = np.random.default_rng(1).integers(0, 256, (80, 32, 32, 3), dtype=np.uint8)  # incompressible
    write_video(tmp_path / "t.mkv", noise, 24, codec="libx264", container="matroska")
    data = (tmp_path / "t.mkv").read_bytes()
    cut = data[: len(data) * 2 // 3]  # ~53 of 80 frames; the clip needs the first ~24 (8 frames at 8 fps)
    _, whole = decode_clips(data, clip_cfg())
    for discard in (False, True):
        _, clips = decode_clips(cut, clip_cfg(), discard_unneeded=discard)
        assert np.array_equal(clips[0].frames, whole[0].frames)
