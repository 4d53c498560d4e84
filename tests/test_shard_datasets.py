"""Today's datasets in their published formats: which columns are picked for each, OpenVid-1M's
clip files relative to a root (the manifest's directory by default), and HD-VILA-100M's nested clip
records read as spans, on real h264 files through the real shard CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from shard_helpers import level_video, shard_small_npy, source_frames

from data_pipeline.manifest import Manifest, ManifestError, default_source_root, resolve_source, sanitise_key
from data_pipeline.shard import main
from data_pipeline.stats import read_stats
from data_pipeline.synthetic import COLOURS, make_synthetic_videos

ROOT = Path(__file__).resolve().parents[1]
OPENVID_HEADER = ["video", "caption", "aesthetic score", "motion score", "temporal consistency score",
                  "camera motion", "frame", "fps", "seconds"]


# ------------------------------------------------------------------ column detection
@pytest.mark.parametrize("name, lines, columns, spans", [
    ("ours.csv", ["key,path,caption", "k,/v.mp4,a cat"], ("key", "path", "caption"), {}),
    ("webvid.csv", ["videoid,contentUrl,duration,page_dir,name", "1,https://x/a.mp4,PT00H00M15S,001,a cat"],
     ("videoid", "contentUrl", "name"), {}),
    ("panda.csv", ["videoID,url,timestamp,caption,matching_score",
                   "v,https://youtu.be/v,\"[['0:00:00.000', '0:00:02.000']]\",\"['a cat']\",0.4"],
     ("videoID", "url", "caption"), {"spans": "timestamp"}),
    ("openvid.csv", [",".join(OPENVID_HEADER), "abc_0.mp4,a cat,5.1,3.2,0.99,static,120,30.0,4.0"],
     ("video", "video", "caption"), {}),
    ("hdvila.jsonl", [json.dumps({"video_id": "v", "url": "https://www.youtube.com/watch?v=v",
                                  "clip": [{"clip_id": "v.1.mp4", "span": ["00:00:01.000", "00:00:02.000"]}]})],
     ("video_id", "url", None), {"spans": "clip"}),
])
def test_published_columns_are_detected(tmp_path, name, lines, columns, spans):
    """Each dataset's own column names pick the right roles: adding OpenVid's `video` and HD-VILA's
    `clip` to the candidates must not make another format pick a wrong column."""
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    m = Manifest(str(p))
    assert (m.columns, m.span_columns) == (columns, spans)
    assert m.shard_rows(0, 10)[0].reject is None


def test_internvid_without_a_source_column_still_asks_for_one(tmp_path):
    p = tmp_path / "internvid.csv"
    p.write_text("YoutubeID,Start_timestamp,End_timestamp,Caption,Aesthetic_Score,UMT_Score\n"
                 "yt1,00:00:01.000,00:00:03.000,a cat,5.0,0.4\n")
    with pytest.raises(ManifestError, match=r"internvid\.csv: no source column .*set columns\.source"):
        Manifest(str(p))


def test_start_end_manifest_still_needs_a_caption_column(tmp_path):
    """Only a spans list may leave captions to its clip records; a row-per-clip manifest without a
    caption column is refused as before, naming the file and the setting."""
    p = tmp_path / "m.csv"
    p.write_text("key,path,start,end\nk,/v.mp4,1,2\n")
    with pytest.raises(ManifestError, match=r"m\.csv: no caption column .*set columns\.caption"):
        Manifest(str(p))


# ------------------------------------------------------------------ relative sources
@pytest.mark.parametrize("source, root, expected", [
    ("abc_0.mp4", "/data/openvid", "/data/openvid/abc_0.mp4"),
    ("part1/abc_0.mp4", "/data/openvid", "/data/openvid/part1/abc_0.mp4"),
    ("abc_0.mp4", "s3://bucket/openvid/", "s3://bucket/openvid/abc_0.mp4"),
    ("abc_0.mp4", "https://host/clips", "https://host/clips/abc_0.mp4"),
    ("/abs/abc_0.mp4", "/data/openvid", "/abs/abc_0.mp4"),
    ("file:///abs/abc_0.mp4", "/data/openvid", "file:///abs/abc_0.mp4"),
    ("https://host/abc_0.mp4", "s3://bucket", "https://host/abc_0.mp4"),
    ("", "/data/openvid", ""),  # stays empty, so the row still fails as missing_source
])
def test_resolve_source(source, root, expected):
    assert resolve_source(source, root) == expected


def test_default_source_root_is_the_manifests_directory_or_parent_url(tmp_path):
    assert default_source_root("https://host/openvid/OpenVid-1M.csv") == "https://host/openvid"
    assert default_source_root(str(tmp_path / "m.csv")) == str(tmp_path)


def test_relative_sources_default_to_the_manifests_directory(tmp_path):
    """Not the working directory: the parent, spawned workers and SLURM tasks may each start elsewhere."""
    d = tmp_path / "openvid"
    d.mkdir()
    p = d / "OpenVid-1M.csv"
    p.write_text(",".join(OPENVID_HEADER) + "\nabc_0.mp4,a cat,5,3,0.9,static,120,30,4\n"
                 "/abs/x_1.mp4,a dog,5,3,0.9,pan,120,30,4\n,no file,5,3,0.9,pan,120,30,4\n")
    rows = Manifest(str(p)).shard_rows(0, 10)
    assert [r.source for r in rows] == [str(d / "abc_0.mp4"), "/abs/x_1.mp4", ""]
    assert rows[0].key == sanitise_key("abc_0.mp4")[0] and rows[0].key.startswith("abc_0_mp4-")
    assert rows[2].reject == "bad_key"  # the empty `video` cell is both key and source
    cache = tmp_path / "cache"
    a = Manifest(str(p), cache_dir=cache, source_root="s3://bucket/openvid")
    b = Manifest(str(p), cache_dir=cache, source_root=str(tmp_path / "clips"))
    assert a.cache_path == b.cache_path, "the root is applied when rows are read, so both share one copy"
    assert a.shard_rows(0, 1)[0].source == "s3://bucket/openvid/abc_0.mp4"
    assert b.shard_rows(0, 1)[0].source == str(tmp_path / "clips" / "abc_0.mp4")


def test_missing_source_root_is_a_config_error(tmp_path, capsys):
    p = tmp_path / "m.csv"
    p.write_text("key,path,caption\nk,v.mp4,a cat\n")
    assert main(["--manifest", str(p), "--out", str(tmp_path / "out"), "--source-root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "source_root" in err and str(tmp_path / "nope") in err and "no such directory" in err


# ------------------------------------------------------------------ HD-VILA clip records
def _hdvila_records() -> list[dict]:
    """Two downloaded videos (a.mp4, b.mp4 beside the manifest) and one with no captions at all,
    whose file does not exist: it must fail as empty_caption without being fetched."""
    def clip(vid: str, n: int, start: str, end: str, caption: str | None = None) -> dict:
        rec = {"clip_id": f"{vid}.{n}.mp4", "span": [start, end]}
        return rec if caption is None else {**rec, "caption": caption}

    a, b, c = "--0aYNbYSoc", "-1AbCdEfGh0", "noCaptions01"
    return [
        {"video_id": a, "url": f"https://www.youtube.com/watch?v={a}", "path": "a.mp4",
         "clip": [clip(a, 1, "00:00:01.000", "00:00:03.000", "a square, early on"),
                  clip(a, 2, "00:00:06.000", "00:00:08.500", "a square, later"),
                  clip(a, 3, "00:00:09.000", "00:00:08.000", "an inverted span")]},
        {"video_id": b, "url": f"https://www.youtube.com/watch?v={b}", "path": "b.mp4",
         "clip": [clip(b, 1, "00:00:00.000", "00:00:02.000", "the other video"),
                  clip(b, 2, "00:00:04.000", "00:00:06.000")]},
        {"video_id": c, "url": f"https://www.youtube.com/watch?v={c}", "path": "missing.mp4",
         "clip": [clip(c, 1, "00:00:00.000", "00:00:02.000"), clip(c, 2, "00:00:02.000", "00:00:04.000")]},
    ]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_hdvila_clip_records_are_spans_in_jsonl_and_parquet(tmp_path):
    """The nested list of clip records survives the mapped Arrow copy (stored as JSON text, like
    Panda-70M's lists) and reads the same from JSON lines and from a parquet list<struct> column."""
    records = _hdvila_records()
    jsonl = _write_jsonl(tmp_path / "hdvila.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "hdvila.parquet")
    assert pa.types.is_list(pq.read_schema(tmp_path / "hdvila.parquet").field("clip").type)
    expected = None
    for m in (Manifest(str(jsonl)), Manifest(str(jsonl), cache_dir=tmp_path / "c1"),
              Manifest(str(tmp_path / "hdvila.parquet"), cache_dir=tmp_path / "c2")):
        rows = m.shard_rows(0, 10)
        expected = expected or rows
        assert rows == expected
    a, b, c = expected
    assert (a.key, a.source, a.reject) == ("--0aYNbYSoc", str(tmp_path / "a.mp4"), None)
    assert [(s.index, s.start_s, s.end_s, s.caption, s.reject, s.clip_id) for s in a.spans] == [
        (0, 1.0, 3.0, "a square, early on", None, "--0aYNbYSoc.1.mp4"),
        (1, 6.0, 8.5, "a square, later", None, "--0aYNbYSoc.2.mp4"),
        (2, 9.0, 8.0, "", "bad_span", "--0aYNbYSoc.3.mp4")]
    assert "span 2" in a.spans[2].detail and "[9, 8]" in a.spans[2].detail
    assert [(s.caption, s.reject) for s in b.spans] == [("the other video", None), ("", "empty_caption")]
    assert "no caption" in b.spans[1].detail
    assert c.reject is None and [s.reject for s in c.spans] == ["empty_caption"] * 2


def test_clip_records_with_a_caption_column_and_odd_elements(tmp_path):
    """A clip's own caption wins over the row's caption column, which covers clips without one;
    an element that holds no span fails alone as bad_span, naming what it was."""
    rec = {"video_id": "v1", "path": "/v.mp4", "caption": "the row's caption",
           "clip": [{"span": [0, 2], "caption": "its own"}, {"span": [2, 4]}, {"clip_id": "no-span"}, "junk"]}
    rows = Manifest(str(_write_jsonl(tmp_path / "m.jsonl", [rec]))).shard_rows(0, 1)
    spans = rows[0].spans
    assert [(s.caption, s.reject) for s in spans] == [("its own", None), ("the row's caption", None),
                                                      ("", "bad_span"), ("", "bad_span")]
    assert "no-span" in spans[2].detail and "'junk'" in spans[3].detail


def test_clip_records_in_a_csv_cell_as_a_python_literal(tmp_path):
    """Derived sets written with pandas' to_csv put clip records in a cell as a Python literal."""
    p = tmp_path / "derived.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([["video_id", "path", "clip"],
                                 ["v1", "v1.mp4", str([{"clip_id": "v1.1.mp4", "span": ["0:00:01.5", "0:00:03"],
                                                        "caption": "a cat"}])]])
    (row,) = Manifest(str(p)).shard_rows(0, 1)
    assert row.source == str(tmp_path / "v1.mp4")
    assert [(s.start_s, s.end_s, s.caption, s.clip_id, s.reject) for s in row.spans] == [
        (1.5, 3.0, "a cat", "v1.1.mp4", None)]


@pytest.mark.slow
def test_hdvila_jsonl_shards_one_sample_per_clip(tmp_path, tiny_bert_dir):
    level_video(tmp_path / "a.mp4")
    level_video(tmp_path / "b.mp4")
    manifest = _write_jsonl(tmp_path / "hdvila.jsonl", _hdvila_records())
    out = tmp_path / "out"
    samples = shard_small_npy(manifest, out, tiny_bert_dir, 0.6)  # 4 of 7 clips failed: 57% <= 60%
    assert sorted(samples) == ["--0aYNbYSoc_000", "--0aYNbYSoc_001", "-1AbCdEfGh0_000"]
    want = {"--0aYNbYSoc_000": ("a square, early on", range(8, 16), "--0aYNbYSoc.1.mp4", "a.mp4"),
            "--0aYNbYSoc_001": ("a square, later", range(48, 56), "--0aYNbYSoc.2.mp4", "a.mp4"),
            "-1AbCdEfGh0_000": ("the other video", range(0, 8), "-1AbCdEfGh0.1.mp4", "b.mp4")}
    for key, (caption, frames, clip_id, video) in want.items():
        s = samples[key]
        assert s["txt"].decode() == caption
        assert source_frames(np.load(io.BytesIO(s["frames.npy"]), allow_pickle=False)) == list(frames)
        meta = json.loads(s["json"])
        assert (meta["clip_id"], meta["source"]) == (clip_id, str(tmp_path.resolve() / video))
    st = read_stats(out, 0)
    fails = {f["key"]: (f["reason"], f["detail"]) for f in st["failures"]}
    assert {k: r for k, (r, _) in fails.items()} == {
        "--0aYNbYSoc_002": "bad_span", "-1AbCdEfGh0_001": "empty_caption",
        "noCaptions01_000": "empty_caption", "noCaptions01_001": "empty_caption"}  # not fetched: no not_found
    assert "span 2" in fails["--0aYNbYSoc_002"][1] and "[9, 8]" in fails["--0aYNbYSoc_002"][1]
    assert st["items"] == 7 and st["samples"] == 3


# ------------------------------------------------------------------ OpenVid-1M through the CLI
def _colour_of(frames: np.ndarray) -> str:
    """The synthetic shape's colour: the mean of the pixels far from the dark background, matched
    to the nearest colour the generator draws with."""
    px = frames.reshape(-1, 3).astype(np.float32)
    mean = px[np.abs(px - 24).sum(axis=1) > 120].mean(axis=0)
    return min(COLOURS, key=lambda c: float(np.abs(mean - np.array(COLOURS[c])).sum()))


@pytest.fixture(scope="module")
def openvid_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An unpacked OpenVid-1M in miniature: clip files named like OpenVid's (`<source>_<n>.mp4`) in
    one folder with OpenVid-1M.csv beside them, its `video` column holding bare file names, plus a
    row whose clip was never unpacked. Returns the folder and clip name → caption."""
    gen = tmp_path_factory.mktemp("gen")
    with open(make_synthetic_videos(gen, n=4, frames=16, size=32, fps=8, seed=3)) as f:
        made = list(csv.DictReader(f))
    folder = tmp_path_factory.mktemp("openvid")
    captions = {}
    with open(folder / "OpenVid-1M.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(OPENVID_HEADER)
        for i, r in enumerate(made):
            name = f"celebv_{r['key']}_{i}.mp4"
            shutil.copy(r["path"], folder / name)
            captions[name] = r["caption"]
            w.writerow([name, r["caption"], "5.2", "3.1", "0.99", "pan right", "16", "8.0", "2.0"])
        w.writerow(["never_unpacked_0.mp4", "a red square moving up", "5", "3", "0.9", "static", "16", "8", "2"])
    return folder, captions


def _shard_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "data_pipeline.shard", *args, "--no-progress"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _samples(out: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset([str(out / "shard-000000.tar")], shardshuffle=False)}


def _check_openvid_shards(out: Path, clips: Path, captions: dict[str, str]) -> dict[str, bytes]:
    """One sample per unpacked clip, keyed by its sanitised file name, with its own caption and
    frames that show its caption's colour; the missing clip fails as not_found at its joined path."""
    samples, clips = _samples(out), clips.resolve()
    keys = {sanitise_key(name)[0]: name for name in captions}
    assert sorted(samples) == sorted(keys)
    for key, s in samples.items():
        name = keys[key]
        assert s["txt"].decode() == captions[name]
        frames = np.load(io.BytesIO(s["frames.npy"]), allow_pickle=False)
        assert frames.shape == (8, 16, 16, 3)
        assert _colour_of(frames) == captions[name].split()[1], (name, captions[name])
        assert json.loads(s["json"])["source"] == str(clips / name)
    (failure,) = read_stats(out, 0)["failures"]
    assert failure["reason"] == "not_found" and str(clips / "never_unpacked_0.mp4") in failure["detail"]
    return {k: s["frames.npy"] for k, s in samples.items()}


@pytest.mark.slow
def test_openvid_csv_shards_with_clips_beside_it_or_under_source_root(tmp_path, openvid_folder, tiny_bert_dir):
    """No column mapping. First the clips sit beside the CSV and the CLI runs from an unrelated
    working directory (relative means the manifest's directory, not the cwd); then the CSV lives
    elsewhere and --source-root, relative to the cwd, points at the clips. Same samples both ways."""
    folder, captions = openvid_folder
    common = ["--samples-per-shard", "10", "--encoder", tiny_bert_dir, "--max-failure-ratio", "0.25",
              "--set", "clip.frames=8", "--set", "clip.fps=8", "--set", "clip.height=16", "--set", "clip.width=16",
              "--set", "storage.format=npy"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _shard_cli(["--manifest", str(folder / "OpenVid-1M.csv"), "--out", str(tmp_path / "beside"), *common],
                   elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "columns ('video', 'video', 'caption')" in r.stderr
    beside = _check_openvid_shards(tmp_path / "beside", folder, captions)

    meta = tmp_path / "meta"
    meta.mkdir()
    shutil.copy(folder / "OpenVid-1M.csv", meta / "OpenVid-1M.csv")
    shutil.copytree(folder, tmp_path / "data")
    r = _shard_cli(["--manifest", "meta/OpenVid-1M.csv", "--out", "rooted", "--source-root", "data", *common],
                   tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rooted = _check_openvid_shards(tmp_path / "rooted", tmp_path / "data", captions)
    assert rooted == beside  # the same clips decoded the same way
