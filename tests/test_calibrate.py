"""The planner's data side: `python -m data_pipeline.calibrate` measures with the real sharder and
loader; `data_pipeline.capacity` turns the unit costs into storage, sharding time and loader cores."""

from __future__ import annotations

import copy
import csv
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import calibrate
from data_pipeline.capacity import (
    DEFAULT_CALIBRATION,
    LOADER_HEADROOM,
    CalibrationError,
    load_calibration,
    parse_calibration,
    plan_data,
)
from data_pipeline.decode import load_npy

TINY = ["--config", "configs/shard/demo.yaml", "--source-size", "64x48", "--source-seconds", "1",
        "--loader-batch", "2"]


def _members(shard_dir: Path) -> dict[str, list[tuple[str, bytes]]]:
    """suffix → [(member name, bytes)] over every tar in shard_dir, read independently of calibrate."""
    out: dict[str, list[tuple[str, bytes]]] = {}
    for path in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                suffix = m.name.split(".", 1)[1]
                out.setdefault(suffix, []).append((m.name, tar.extractfile(m).read()))
    return out


def test_cli_bytes_per_sample_are_the_shard_files_over_their_samples(tmp_path, tiny_bert_dir):
    work, out = tmp_path / "work", tmp_path / "cal.json"
    assert calibrate.main(TINY + ["--clips", "6", "--encoder", tiny_bert_dir, "--image-frames", "2",
                                  "--work-dir", str(work), "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    shards = work / "shards"
    index = json.loads((shards / "index.json").read_text())
    members = _members(shards)
    samples = len(members["mp4"])
    assert samples == index["total"] == rec["counts"]["samples"] == 6
    tar_bytes = sum(p.stat().st_size for p in shards.glob("shard-*.tar"))
    b = rec["bytes_per_sample"]
    assert b["total"] == pytest.approx(tar_bytes / samples, rel=1e-12)
    assert b["video"] == pytest.approx(sum(len(d) for _, d in members["mp4"]) / samples, rel=1e-12)
    assert b["embedding"] == pytest.approx(sum(len(d) for _, d in members["emb.npy"]) / samples, rel=1e-12)
    assert b["other"] == pytest.approx(b["total"] - b["video"] - b["embedding"], rel=1e-12)
    embs = [load_npy(d, n) for n, d in members["emb.npy"]]
    assert rec["embedding"]["dim"] == 32 == embs[0].shape[1]  # the tiny BERT's width
    assert rec["embedding"]["mean_tokens"] == pytest.approx(np.mean([e.shape[0] for e in embs]))
    assert rec["embedding"]["npy_header_bytes"] == pytest.approx(
        b["embedding"] - rec["embedding"]["mean_tokens"] * 32 * 2)
    assert rec["encoder"] == {**rec["encoder"], "name": tiny_bert_dir, "configured": "minilm", "stand_in": True}

    cpu = rec["shard_cpu_s_per_video"]  # from the shard JSONs: the worker's process CPU time, in parts
    stats = [json.loads(p.read_text()) for p in shards.glob("shard-*.json")]
    assert cpu["total"] == pytest.approx(sum(s["cpu_seconds"] for s in stats) / 6, rel=1e-9)
    assert cpu["encode"] > 0 and cpu["embed"] > 0 and cpu["decode"] > 0
    assert cpu["decode"] + cpu["encode"] + cpu["embed"] == pytest.approx(cpu["total"])
    assert rec["loader"]["cpu_s_per_sample"] > 0 and rec["loader"]["image_frames"] == 2
    assert rec["version"] == 1 and rec["command"].startswith("python -m data_pipeline.calibrate --config")
    assert rec["machine"]["cpu_model"] and rec["machine"]["torch"] and rec["machine"]["av"]
    cal = load_calibration(out)  # what the planner reads
    assert (cal.frames, cal.height, cal.width, cal.clip_format) == (8, 16, 16, "mp4")


def test_cli_on_a_manifest_with_npy_clips_stores_exactly_the_raw_frames(tmp_path, tiny_bert_dir, synthetic_videos):
    work, out = tmp_path / "work", tmp_path / "cal.json"
    webvid = tmp_path / "webvid.csv"  # WebVid's columns, mapped explicitly as a user's config would
    with open(synthetic_videos, encoding="utf-8") as f, open(webvid, "w", newline="", encoding="utf-8") as g:
        w = csv.writer(g)
        w.writerow(["videoid", "contentUrl", "name"])
        w.writerows((r["key"], r["path"], r["caption"]) for r in csv.DictReader(f))
    columns = ["--set", "columns.key=videoid", "--set", "columns.source=contentUrl", "--set", "columns.caption=name"]
    assert calibrate.main(TINY + columns + ["--clips", "4", "--encoder", tiny_bert_dir, "--manifest", str(webvid),
                                            "--set", "storage.format=npy", "--work-dir", str(work),
                                            "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["source"]["kind"] == "manifest" and rec["counts"]["videos"] == 4 == rec["counts"]["samples"]
    assert rec["bytes_per_sample"]["video"] == 8 * 16 * 16 * 3 + 128  # uint8 [8,16,16,3] + the .npy header
    keys = sorted(n.split(".")[0] for n, _ in _members(work / "shards")["frames.npy"])
    assert keys == ["vid000000", "vid000001", "vid000002", "vid000003"]  # the manifest's first rows


def test_cli_names_a_missing_encoder_with_the_stand_in_and_a_missing_manifest(tmp_path, capsys):
    assert calibrate.main(TINY + ["--clips", "2", "--encoder", str(tmp_path / "no_such_bert"),
                                  "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "no_such_bert" in err and "--encoder minilm" in err
    assert not (tmp_path / "c.json").exists()
    assert calibrate.main(TINY + ["--manifest", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "c.json")]) == 2
    assert "absent.csv does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------- capacity arithmetic


def _record(**changes) -> dict:
    """A calibration record with round numbers (16x64x64 mp4, MiniLM 384-d, 12.5 tokens)."""
    rec = {
        "version": 1, "created_utc": "2026-01-01T00:00:00Z", "machine": {"cpu_model": "test"},
        "geometry": {"frames": 16, "height": 64, "width": 64, "format": "mp4"},
        "source": {"kind": "synthetic_textured", "videos": 64},
        "encoder": {"name": "minilm", "configured": "minilm", "dim": 384, "device": "cpu"},
        "samples_per_video": 1.0,
        "bytes_per_sample": {"total": 33728.0, "video": 20000.0, "embedding": 9728.0, "other": 4000.0},
        "embedding": {"mean_tokens": 12.5, "dim": 384, "npy_header_bytes": 128.0},
        "shard_cpu_s_per_video": {"total": 0.028, "decode": 0.02, "encode": 0.006, "embed": 0.002},
        "loader": {"cpu_s_per_sample": 0.005, "image_frames": 8},
    }
    for dotted, value in changes.items():
        cur = rec
        *parents, last = dotted.split("__")
        for p in parents:
            cur = cur[p]
        cur[last] = value
    return rec


def _cal(**changes):
    return parse_calibration(_record(**changes), "test.json")


PLAN = {"videos": 1_000_000, "frames": 16, "height": 64, "width": 64, "text_dim": 384, "clips_per_s_per_gpu": 100.0,
        "gpus": 8, "shard_nodes": 2, "shard_cores_per_node": 16}


def test_plan_at_the_calibrated_geometry_is_the_unit_costs_times_the_counts():
    p = plan_data(_cal(), **PLAN)
    assert p.bytes_per_sample == 33728.0
    assert p.dataset_bytes == pytest.approx(33.728e9)
    assert (p.dataset_bytes_video, p.dataset_bytes_embedding, p.dataset_bytes_other) == pytest.approx((20e9, 9.728e9, 4e9))
    assert p.shard_clip_cpu_hours == pytest.approx(1e6 * 0.026 / 3600)  # 7.22 h
    assert p.shard_embed_cpu_hours == pytest.approx(1e6 * 0.002 / 3600) and p.shard_embed_gpu_hours is None
    assert p.shard_wall_hours == pytest.approx(1e6 * 0.028 / 3600 / 32)  # 2 nodes x 16 cores
    assert p.loader_cores_per_gpu == pytest.approx(0.5)  # 100 clips/s x 5 ms
    assert p.loader_workers_per_gpu == 1 and p.loader_cores_total == 8
    assert all(v.startswith("measured") for v in p.sources.values()), p.sources
    assert p.as_dict()["sources"] == p.sources and json.dumps(p.as_dict())
    assert any("33.73 GB" in line for line in p.lines())


def test_loader_workers_are_the_need_times_the_headroom_rounded_up():
    for rate, workers in [(400.0, math.ceil(2.0 * LOADER_HEADROOM)), (500.0, math.ceil(2.5 * LOADER_HEADROOM)),
                          (1.0, 1)]:
        p = plan_data(_cal(), **{**PLAN, "clips_per_s_per_gpu": rate})
        assert p.loader_workers_per_gpu == workers and p.loader_cores_total == 8 * workers


def test_embedding_on_gpus_takes_its_own_wall_time():
    p = plan_data(_cal(), **PLAN, embed_captions_per_s_per_gpu=500.0, shard_gpus_per_node=1)
    assert p.shard_embed_gpu_hours == pytest.approx(1e6 / 500 / 3600) and p.shard_embed_cpu_hours == 0.0
    assert p.shard_cpu_hours == pytest.approx(p.shard_clip_cpu_hours)
    # the GPUs (2 x 1 at 500/s: 0.278 h) are slower than the CPUs (7.22 CPU-h / 32 cores: 0.226 h)
    assert p.shard_wall_hours == pytest.approx(1e6 / 500 / 3600 / 2)
    assert p.sources["shard_embed"].startswith("given")
    fast = plan_data(_cal(), **PLAN, embed_captions_per_s_per_gpu=5000.0, shard_gpus_per_node=4)
    assert fast.shard_wall_hours == pytest.approx(1e6 * 0.026 / 3600 / 32)


def test_another_encoder_width_rescales_the_embedding_bytes_and_says_so():
    p = plan_data(_cal(), **{**PLAN, "text_dim": 1024})  # bert-large
    assert p.bytes_per_sample_embedding == 12.5 * 1024 * 2 + 128
    assert p.bytes_per_sample_video == 20000.0 and p.bytes_per_sample_other == 4000.0
    assert "computed" in p.sources["embedding_bytes"] and "1024-d" in p.sources["embedding_bytes"]
    assert "stand-in" in p.sources["shard_embed"]
    longer = plan_data(_cal(), **{**PLAN, "text_dim": 1024}, mean_tokens=20.0)
    assert longer.bytes_per_sample_embedding == 20.0 * 1024 * 2 + 128 and "given" in longer.sources["embedding_bytes"]


def test_another_geometry_scales_video_bytes_and_cpu_by_pixels_and_decode_by_frames():
    p = plan_data(_cal(), **{**PLAN, "frames": 9, "height": 128, "width": 128})
    px, t = 9 * 128 * 128 / (16 * 64 * 64), 9 / 16  # 2.25, 0.5625
    assert p.bytes_per_sample_video == pytest.approx(20000.0 * px)
    assert p.shard_clip_cpu_hours == pytest.approx(1e6 * (0.02 * t + 0.006 * px) / 3600)
    assert p.loader_cpu_s_per_sample == pytest.approx(0.005 * px)
    assert p.loader_cores_per_gpu == pytest.approx(100 * 0.005 * px)
    assert p.bytes_per_sample_embedding == 9728.0  # the text does not depend on the clip
    for key in ("video_bytes", "shard_clip_cpu", "loader_cpu"):
        assert p.sources[key].startswith("scaled") and "16x64x64" in p.sources[key], p.sources


def test_npy_clips_are_computed_exactly_and_formats_do_not_mix():
    npy = _cal(geometry__format="npy", bytes_per_sample__video=16 * 64 * 64 * 3 + 128.0)
    p = plan_data(npy, **{**PLAN, "frames": 9, "height": 128, "width": 128})
    assert p.bytes_per_sample_video == 9 * 128 * 128 * 3 + 128 and p.sources["video_bytes"].startswith("computed")
    with pytest.raises(ValueError, match="storage.format=npy"):
        plan_data(_cal(), **PLAN, clip_format="npy")
    with pytest.raises(ValueError, match="gpus"):
        plan_data(_cal(), **{**PLAN, "gpus": 0})


@pytest.mark.parametrize("mutate, field, says", [
    (lambda r: r["loader"].pop("cpu_s_per_sample"), "loader.cpu_s_per_sample", "missing"),
    (lambda r: r["bytes_per_sample"].update(video="20 kB"), "bytes_per_sample.video", "'20 kB'"),
    (lambda r: r["shard_cpu_s_per_video"].update(decode=-1.0), "shard_cpu_s_per_video.decode", ">= 0"),
    (lambda r: r["embedding"].update(dim=384.5), "embedding.dim", "whole number"),
    (lambda r: r["geometry"].update(format="webm"), "geometry.format", "'webm'"),
    (lambda r: r.update(version=2), "version", "version 1"),
])
def test_a_malformed_calibration_names_the_file_and_the_field(tmp_path, mutate, field, says):
    rec = copy.deepcopy(_record())
    mutate(rec)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(rec))
    with pytest.raises(CalibrationError) as e:
        load_calibration(path)
    assert str(path) in str(e.value) and repr(field) in str(e.value) and says in str(e.value)


def test_unreadable_calibrations_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"version": 1,')
    with pytest.raises(CalibrationError, match=r"broken\.json: not valid JSON"):
        load_calibration(bad)
    with pytest.raises(CalibrationError, match=r"absent\.json: cannot read"):
        load_calibration(tmp_path / "absent.json")


def test_the_shipped_default_is_the_webvid_geometry_with_a_bert_large_stand_in():
    cal = load_calibration(None)
    assert cal.path == str(DEFAULT_CALIBRATION)
    assert (cal.frames, cal.height, cal.width, cal.clip_format) == (16, 64, 64, "mp4")
    assert cal.configured_encoder == "bert-large-uncased" and cal.encoder == "minilm" and cal.embed_dim == 384
    p = plan_data(cal, **{**PLAN, "videos": 10_000_000, "text_dim": 1024})
    assert "stand-in" in p.sources["shard_embed"] and p.sources["video_bytes"].startswith("measured")
    assert p.bytes_per_sample_embedding == pytest.approx(cal.mean_tokens * 2048 + cal.npy_header_bytes)
