"""Shard-time motion score and filters (issue 9 item 4) on real h264 files decoded by PyAV:
the score's definition, each filter's reason in the shard JSON and the index, the score in every
sample's `{key}.json`, and which settings enter the config hash."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from shard_helpers import write_manifest

from common.config import ConfigError, from_dict
from common.mp4 import write_video
from data_pipeline.config import ClipConfig, FilterConfig, ShardConfig, config_hash, content_settings
from data_pipeline.filters import Filtered, check_source
from data_pipeline.loader import build_loader
from data_pipeline.loader_config import DataConfig
from data_pipeline.motion import motion_score
from data_pipeline.shard import main
from data_pipeline.stats import read_stats
from data_pipeline.synthetic import render_clip
from data_pipeline.video import VideoInfo, decode_clips

CLIP = {"frames": 8, "fps": 8, "height": 16, "width": 16}


def _video(path: Path, *, travel: float = 0.6, t: int = 16, h: int = 32, w: int = 32) -> Path:
    """A red square crossing `travel` of the frame (travel=0: a static clip), as real h264."""
    frames = render_clip("square", "red", "right", t, h, w, (h / 2, w / 4), travel=travel, wrap=False)
    write_video(path, frames, 8, codec="libx264")
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """One file per filter outcome, named by the reason it must get (`moving` passes every filter)."""
    d = tmp_path_factory.mktemp("filters")
    return {
        "moving": _video(d / "moving.mp4"),
        "static_clip": _video(d / "static.mp4", travel=0.0),
        "too_short": _video(d / "short.mp4", t=10),  # 1.25 s: enough frames for the clip, under 1.5 s
        "too_small": _video(d / "small.mp4", h=20, w=20),
        "bad_aspect": _video(d / "wide.mp4", h=32, w=96),  # 3:1
    }


def _shard(tmp_path: Path, manifest: Path, tiny_bert_dir: str, filt: dict | None = None, **extra) -> Path:
    out = tmp_path / "out"
    cfg = {"manifest": str(manifest), "out_dir": str(out), "samples_per_shard": 10, "clip": dict(CLIP),
           "storage": {"format": "npy"}, "encoder": {"name_or_path": tiny_bert_dir}, "max_failure_ratio": 1.0}
    if filt:
        cfg["filter"] = filt
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 0
    return out


def _samples(out: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset([str(out / "shard-000000.tar")], shardshuffle=False)}


def test_motion_score_definition():
    moving = render_clip("circle", "blue", "down", 8, 32, 32, (8, 16), travel=0.5, wrap=False)
    static = render_clip("circle", "blue", "down", 8, 32, 32, (8, 16), travel=0.0)
    assert motion_score(static) == 0.0
    assert 0.0 < motion_score(moving) < 0.1
    flip = np.zeros((3, 4, 4, 3), np.uint8)
    flip[1] = 255
    assert motion_score(flip) == 1.0  # black → white → black: every pixel changes by the full range
    # frames repeated to pad a short clip do not dilute the score; fewer than 2 real frames score 0
    padded = np.concatenate([moving, np.repeat(moving[-1:], 8, axis=0)])
    assert motion_score(padded, padded=8) == pytest.approx(motion_score(moving))
    assert motion_score(padded) < motion_score(moving)
    assert motion_score(moving[:1]) == 0.0


def test_decoded_clips_carry_their_motion(videos):
    _, static = decode_clips(str(videos["static_clip"]), ClipConfig(**CLIP))
    _, moving = decode_clips(str(videos["moving"]), ClipConfig(**CLIP))
    assert static[0].motion < 0.001 < 0.005 < moving[0].motion
    assert moving[0].motion == motion_score(moving[0].frames)


def test_source_checks_name_the_reason_and_the_threshold():
    info = VideoInfo(width=96, height=32, fps=8.0, duration_s=2.0, codec="h264", container="mp4")
    check_source(info, FilterConfig())  # all off: nothing raised
    for f, reason, words in ((FilterConfig(min_duration_s=3), "too_short", "filter.min_duration_s=3"),
                             (FilterConfig(min_side=48), "too_small", "shorter side 32"),
                             (FilterConfig(max_aspect=2.5), "bad_aspect", "aspect 3.000")):
        with pytest.raises(Filtered) as e:
            check_source(info, f)
        assert e.value.reason == reason and words in e.value.detail
    # anamorphic: 32x32 stored pixels shown 3:1 wide; a span is measured, cut to the video's end
    with pytest.raises(Filtered, match="bad_aspect"):
        check_source(VideoInfo(32, 32, 8.0, 2.0, "h264", "mp4", sar=3.0), FilterConfig(max_aspect=2.5))
    with pytest.raises(Filtered, match="span 0.500 s"):
        check_source(info, FilterConfig(min_duration_s=1), span=(1.5, 4.0))
    check_source(info, FilterConfig(min_duration_s=1), span=(0.5, 1.5))
    check_source(VideoInfo(32, 32, None, None, "h264", "mp4"), FilterConfig(min_duration_s=9))  # unknown: passes


@pytest.mark.slow
def test_each_filter_fails_its_clip_with_its_reason(tmp_path, videos, tiny_bert_dir):
    manifest = write_manifest(tmp_path / "m.csv", [(k, str(p), f"a clip that is {k}") for k, p in videos.items()])
    out = _shard(tmp_path, manifest, tiny_bert_dir,
                 {"min_motion": 0.002, "min_duration_s": 1.5, "min_side": 24, "max_aspect": 2.5})
    samples = _samples(out)
    assert sorted(samples) == ["moving"]
    meta = json.loads(samples["moving"]["json"])
    frames = np.load(io.BytesIO(samples["moving"]["frames.npy"]), allow_pickle=False)
    assert meta["motion"] == pytest.approx(motion_score(frames), abs=1e-6) and meta["motion"] > 0.002
    st = read_stats(out, 0)
    assert {f["key"]: f["reason"] for f in st["failures"]} == {k: k for k in videos if k != "moving"}
    assert st["by_reason"] == {"bad_aspect": 1, "static_clip": 1, "too_short": 1, "too_small": 1}
    static = next(f for f in st["failures"] if f["reason"] == "static_clip")
    assert "filter.min_motion=0.002" in static["detail"]
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 1 and index["failed"] == 4 and index["by_reason"] == st["by_reason"]
    assert index["motion"] == "mad_v1"


@pytest.mark.slow
def test_filters_are_off_by_default_and_every_sample_is_scored(tmp_path, videos, tiny_bert_dir):
    manifest = write_manifest(tmp_path / "m.csv", [(k, str(p), f"clip {k}") for k, p in videos.items()])
    out = _shard(tmp_path, manifest, tiny_bert_dir)
    samples = _samples(out)
    assert sorted(samples) == sorted(videos)  # nothing filtered
    motion = {k: json.loads(s["json"])["motion"] for k, s in samples.items()}
    assert motion["static_clip"] == pytest.approx(0.0, abs=1e-4) and motion["moving"] > 0.005
    # the loader leaves the static clip out by its JSON, without re-sharding, and counts it
    data = DataConfig(shards=str(out), batch_size=1, num_workers=0, shuffle_buffer=0, num_frames=8, image_size=16,
                      min_motion=0.002)
    assert sorted(k for b in build_loader(data, train=False) for k in b["keys"]) == sorted(set(videos) - {"static_clip"})
    loader = build_loader(data)
    keys = [k for _, b in zip(range(len(videos)), loader) for k in b["keys"]]  # one epoch and one more clip
    assert "static_clip" not in keys and set(keys) == set(videos) - {"static_clip"}
    assert loader.filtered_samples >= 1 and loader.skipped_samples == 0


@pytest.mark.slow
def test_static_clips_of_a_video_that_also_moves_are_counted(tmp_path, tiny_bert_dir):
    """clips_per_video=2 over a video that stands still for 2 s, then moves: the static clip is
    dropped and counted (`clips_filtered`), the moving one kept; no failure, the video gave a clip."""
    still = render_clip("square", "green", "right", 16, 32, 32, (16, 8), travel=0.0)
    moves = render_clip("square", "green", "right", 16, 32, 32, (16, 8), travel=0.6, wrap=False)
    write_video(tmp_path / "half.mp4", np.concatenate([still, moves]), 8, codec="libx264")
    manifest = write_manifest(tmp_path / "m.csv", [("half", str(tmp_path / "half.mp4"), "still, then moving")])
    out = _shard(tmp_path, manifest, tiny_bert_dir, {"min_motion": 0.002}, clip={"clips_per_video": 2})
    assert sorted(_samples(out)) == ["half_001"]
    st = read_stats(out, 0)
    assert st["failed"] == 0 and st["clips_filtered"] == {"static_clip": 1}
    assert json.loads((out / "index.json").read_text())["clips_filtered"] == {"static_clip": 1}


def test_only_filters_that_are_on_enter_the_config_hash():
    base = from_dict(ShardConfig, {"manifest": "m.csv"})
    assert "filter" not in content_settings(base)  # configs from before filters keep their hash
    on = from_dict(ShardConfig, {"manifest": "m.csv", "filter": {"min_motion": 0.01}})
    assert content_settings(on)["filter"] == {"min_motion": 0.01} and config_hash(on) != config_hash(base)
    other = from_dict(ShardConfig, {"manifest": "m.csv", "filter": {"min_motion": 0.02}})
    assert config_hash(other) != config_hash(on)


@pytest.mark.parametrize("filt, words", [({"min_motion": 2}, "in \\[0, 1\\]"), ({"min_side": -1}, "filter.min_side"),
                                         ({"max_aspect": 0.5}, ">= 1"),
                                         ({"min_motion": 0.1, "frames": 1}, "clip.frames >= 2")])
def test_bad_filter_settings_are_refused_naming_the_key(filt, words):
    filt = dict(filt)
    frames = filt.pop("frames", 8)
    cfg = from_dict(ShardConfig, {"manifest": "m.csv", "filter": filt, "clip": {"frames": frames}})
    with pytest.raises(ConfigError, match=words):
        cfg.validate()


@pytest.mark.slow
def test_filters_fail_single_spans_with_their_reason(tmp_path, tiny_bert_dir):
    """Clip spans: a still span fails as static_clip, a short one as too_short (its own length, not
    the video's), and the moving span of the same video is kept."""
    still = render_clip("circle", "blue", "right", 16, 32, 32, (16, 8), travel=0.0)
    moves = render_clip("circle", "blue", "right", 16, 32, 32, (16, 8), travel=0.6, wrap=False)
    write_video(tmp_path / "v.mp4", np.concatenate([still, moves]), 8, codec="libx264")
    manifest = write_manifest(tmp_path / "m.csv", [("v", str(tmp_path / "v.mp4"), "a blue circle",
                                                    "[[0, 2], [2, 4], [3.25, 4]]")],
                              header=("key", "path", "caption", "spans"))
    out = _shard(tmp_path, manifest, tiny_bert_dir, {"min_motion": 0.002, "min_duration_s": 1.0})
    assert sorted(_samples(out)) == ["v_001"]
    fails = {f["key"]: (f["reason"], f["detail"]) for f in read_stats(out, 0)["failures"]}
    assert fails["v_000"][0] == "static_clip"
    assert fails["v_002"] == ("too_short", "span 0.750 s < filter.min_duration_s=1")
