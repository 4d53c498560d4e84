"""Clip spans (Panda-70M: a list of [start, end] per row with parallel captions; InternVid: a start
and an end column per row): parsing, per-span reasons, seek-decoding inside the span on real h264
files, and `{key}_{span:03d}` samples in real shards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from shard_helpers import level_video, shard_small_npy, source_frames

from data_pipeline.config import ClipConfig, ColumnsConfig
from data_pipeline.manifest import Manifest, parse_time
from data_pipeline.stats import read_stats
from data_pipeline.video import DecodeError, decode_clips


@pytest.fixture(scope="module")
def level_videos(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("spans")
    return level_video(d / "a.mp4"), level_video(d / "b.mp4")


def test_parse_time_forms():
    assert parse_time("12.5") == 12.5 and parse_time(3) == 3.0
    assert parse_time("0:00:05.213") == pytest.approx(5.213)
    assert parse_time("01:02:03.5") == pytest.approx(3723.5) and parse_time("1:05") == 65.0
    for bad in ("", "abc", "1:75:00", "1:2:3:4", "nan", "inf", None, True):
        assert parse_time(bad) is None, bad


def test_decode_inside_a_span_by_seeking(level_videos):
    cfg = ClipConfig(frames=8, fps=8, height=16, width=16)
    info, clips = decode_clips(str(level_videos[0]), cfg, span=(6.0, 8.0))
    assert len(clips) == 1 and clips[0].start_s == 6.0
    assert source_frames(clips[0].frames) == list(range(48, 56))
    assert info.frames_decoded < 48, "reached 6 s by seeking, not by decoding from the start"
    # stride mode: only frames inside [start, end)
    info, clips = decode_clips(str(level_videos[0]), ClipConfig(frames=4, stride=2, height=16, width=16),
                               span=(4.0, 5.0))
    assert source_frames(clips[0].frames) == [32, 34, 36, 38]
    # two clips spread over one span, never past its end
    _, clips = decode_clips(str(level_videos[0]), ClipConfig(frames=8, fps=8, height=16, width=16,
                                                              clips_per_video=2), span=(2.0, 5.0))
    got = [source_frames(c.frames) for c in clips]
    assert got == [list(range(16, 24)), list(range(32, 40))]
    for span, reason in (((12.5, 13.0), "span_out_of_range"), ((10.0, 14.0), "span_out_of_range"),
                         ((6.0, 6.5), "too_short")):
        with pytest.raises(DecodeError) as e:
            decode_clips(str(level_videos[0]), cfg, span=span)
        assert e.value.reason == reason, span


def _panda_manifest(path: Path, a: Path, b: Path) -> Path:
    rows = [
        ["vidA", str(a), "[['0:00:00.000', '0:00:02.000'], ['0:00:06.000', '0:00:08.500'], ['0:00:09', '0:00:08']]",
         "['a red square moving right', 'a blue circle', 'an inverted span']"],
        ["vidB", str(b), "[[1.0, 3.0], [11.5, 14.0], [3.0, 3.5]]", "one caption for every span"],
        ["vidC", str(b), "[[0, 2], [2, 4]]", "['only one caption']"],  # captions that do not match: bad_span
        ["vidD", str(b), "not a list", "x"],
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoID", "url", "timestamp", "caption", "matching_score"])
        for r in rows:
            w.writerow(r + ["0.5"])
    return path


def test_manifest_spans_and_parallel_captions(tmp_path, level_videos):
    p = _panda_manifest(tmp_path / "panda.csv", *level_videos)
    parsed = Manifest(str(p))
    mapped = Manifest(str(p), cache_dir=tmp_path / "cache")
    assert parsed.span_columns == mapped.span_columns == {"spans": "timestamp"}
    assert parsed.columns == ("videoID", "url", "caption")
    rows = mapped.shard_rows(0, 10)
    assert rows == parsed.shard_rows(0, 10)
    a, b, c, d = rows
    assert [(s.index, s.start_s, s.end_s, s.caption, s.reject) for s in a.spans] == [
        (0, 0.0, 2.0, "a red square moving right", None), (1, 6.0, 8.5, "a blue circle", None),
        (2, 9.0, 8.0, "", "bad_span")]
    assert [s.caption for s in b.spans] == ["one caption for every span"] * 3 and b.reject is None
    assert c.reject == "bad_span" and d.reject == "bad_span"


def test_start_end_columns_number_the_clips_of_a_video(tmp_path, level_videos):
    p = tmp_path / "internvid.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["YoutubeID", "Start_timestamp", "End_timestamp", "Caption", "path"])
        w.writerow(["yt1", "00:00:01.000", "00:00:03.000", "first clip", str(level_videos[0])])
        w.writerow(["yt2", "00:00:00.000", "00:00:02.000", "other video", str(level_videos[1])])
        w.writerow(["yt1", "00:00:05.000", "00:00:07.500", "second clip", str(level_videos[0])])
        w.writerow(["yt1", "00:00:05.000", "oops", "unreadable end", str(level_videos[0])])
    cols = ColumnsConfig(source="path")
    for m in (Manifest(str(p), columns=cols), Manifest(str(p), columns=cols, cache_dir=tmp_path / "c")):
        assert m.span_columns == {"start": "Start_timestamp", "end": "End_timestamp"}
        rows = m.shard_rows(0, 10)
        assert [(r.key, r.reject, r.spans[0].index, r.spans[0].start_s, r.spans[0].reject) for r in rows] == [
            ("yt1", None, 0, 1.0, None), ("yt2", None, 0, 0.0, None), ("yt1", None, 1, 5.0, None),
            ("yt1", None, 2, 0.0, "bad_span")]


@pytest.mark.slow
def test_spans_become_samples_in_real_shards(tmp_path, level_videos, tiny_bert_dir):
    manifest = _panda_manifest(tmp_path / "panda.csv", *level_videos)
    out = tmp_path / "out"
    samples = shard_small_npy(manifest, out, tiny_bert_dir, 0.7)  # 5 of 8 items failed: 62.5% <= 70%
    assert sorted(samples) == ["vidA_000", "vidA_001", "vidB_000"]
    assert samples["vidA_001"]["txt"].decode() == "a blue circle"
    assert samples["vidB_000"]["txt"].decode() == "one caption for every span"
    meta = json.loads(samples["vidA_001"]["json"])
    assert (meta["span"], meta["span_start_s"], meta["span_end_s"], meta["row"]) == (1, 6.0, 8.5, 0)
    frames = np.load(__import__("io").BytesIO(samples["vidA_001"]["frames.npy"]), allow_pickle=False)
    assert source_frames(frames) == list(range(48, 56))  # the span's frames, nothing else
    emb = {k: np.load(__import__("io").BytesIO(s["emb.npy"]), allow_pickle=False) for k, s in samples.items()}
    assert not np.array_equal(emb["vidA_000"], emb["vidA_001"])  # each span embeds its own caption
    st = read_stats(out, 0)
    fails = {(f["key"], f["reason"]) for f in st["failures"]}
    assert fails == {("vidA_002", "bad_span"), ("vidB_001", "span_out_of_range"), ("vidB_002", "too_short"),
                     ("vidC", "bad_span"), ("vidD", "bad_span")}
    assert st["items"] == 8  # 3 + 3 spans, and two rows whose spans could not be read
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 3 and index["failed"] == 5 and index["videos_ok"] == 2
