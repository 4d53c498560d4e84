"""`python -m data_pipeline.shard` end to end: real videos, bad inputs of every kind, a real HTTP
server, shards read back with webdataset and tarfile, resumption, determinism, exit codes."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds
from shard_helpers import VideoServer, assert_identical_shards, make_bad_files

from data_pipeline.manifest import sanitise_key
from data_pipeline.shard import main

# reason → raw keys the sharder must report (filled by the fixture)
EXPECTED_FAILURES: dict[str, set[str]] = {}


def _write_webvid_manifest(path: Path, rows: list[tuple[str, str, bytes | str]]) -> None:
    """WebVid-10M layout (videoid, contentUrl, duration, page_dir, name); captions may be raw bytes."""
    out = io.BytesIO()
    out.write(b"videoid,contentUrl,duration,page_dir,name\n")
    for key, url, caption in rows:
        cap = caption if isinstance(caption, bytes) else caption.encode()
        line = io.StringIO()
        csv.writer(line).writerow([key, url, "PT00H00M02S", "000"])
        out.write(line.getvalue().rstrip("\r\n").encode() + b',"' + cap + b'"\n')
    path.write_bytes(out.getvalue())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, synthetic_videos):
    """12 good videos (8 local, 2 via HTTP, 2 via file://) + one row per kind of bad input."""
    d = tmp_path_factory.mktemp("shard_cli")
    good = list(csv.DictReader(open(synthetic_videos, encoding="utf-8")))
    bad = make_bad_files(d / "bad")
    server = VideoServer({f"/{r['key']}.mp4": Path(r["path"]).read_bytes() for r in good[8:10]})
    server.__enter__()
    rows: list[tuple[str, str, bytes | str]] = []
    for r in good[:8]:
        rows.append((r["key"], r["path"], r["caption"]))
    for r in good[8:10]:
        rows.append((r["key"], f"{server.url}/{r['key']}.mp4", r["caption"]))
    for r in good[10:12]:
        rows.append((r["key"], "file://" + r["path"], r["caption"]))
    # a key webdataset could not group as is ('.' splits member names): sanitised, stable, raw key kept
    rows.append(("clip.v2 (final)", good[0]["path"], good[0]["caption"]))
    good_keys = {sanitise_key(r[0])[0]: r[2] for r in rows}
    EXPECTED_FAILURES.clear()
    for reason, path in bad.items():
        key = f"bad_{reason}"
        rows.append((key, str(path), "a video that must fail"))
        EXPECTED_FAILURES.setdefault(reason.replace("_text", ""), set()).add(key)
    extra = [("http404", f"{server.url}/missing.mp4", "x", "http_404"),
             ("http500", f"{server.url}/500", "x", "http_500"),
             ("hanging", f"{server.url}/hang", "x", "timeout"),
             ("oversized", f"{server.url}/big-no-length", "x", "too_large"),
             ("../escape", good[0]["path"], "a red square", "unsafe_key"),
             ("dir/key", good[0]["path"], "a red square", "unsafe_key"),
             ("nocaption", good[0]["path"], "  ", "empty_caption"),
             ("latin1", good[0]["path"], b"caf\xe9", "caption_not_utf8")]
    for key, url, cap, reason in extra:
        rows.append((key, url, cap))
        EXPECTED_FAILURES.setdefault(reason, set()).add(key)
    manifest = d / "webvid.csv"
    _write_webvid_manifest(manifest, rows)
    yield {"dir": d, "manifest": manifest, "good": good_keys, "rows": rows, "server": server}
    server.__exit__(None, None, None)


def _config(tmp_path: Path, tiny_bert_dir: str, **extra) -> Path:
    cfg = {
        "samples_per_shard": 8,
        "clip": {"frames": 8, "fps": 8, "height": 16, "width": 16},
        "encoder": {"name_or_path": tiny_bert_dir, "batch_size": 3},
        "fetch": {"timeout_s": 0.5, "total_timeout_s": 3, "retries": 1, "backoff_s": 0.01, "max_bytes": 1 << 20},
        "workers": 1,
        "max_failure_ratio": 1.0,
    }
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    import yaml

    p = tmp_path / "shard.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run(tmp_path, tiny_bert_dir, manifest, out, *more, **cfg_extra) -> int:
    return main(["--config", str(_config(tmp_path, tiny_bert_dir, **cfg_extra)), "--manifest", str(manifest),
                 "--out", str(out), "--no-progress", *more])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, dataset, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("run1")
    code = _run(tmp, tiny_bert_dir, dataset["manifest"], tmp / "out")
    return tmp / "out", code


def test_good_videos_land_in_shards_readable_by_webdataset(first_run, dataset):
    out, code = first_run
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    n_rows = len(dataset["rows"])
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range((n_rows + 7) // 8)]
    assert index["total"] == len(dataset["good"]) == sum(s["count"] for s in index["shards"])
    assert index["encoder"]["dim"] == 32 and index["format"] == "mp4"
    assert index["clip"] == {"frames": 8, "height": 16, "width": 16, "fps": 8.0, "stride": None}
    urls = [str(out / s["name"]) for s in index["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        key = sample["__key__"]
        assert key not in seen
        caption = sample["txt"].decode("utf-8")
        seen[key] = caption
        emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
        assert emb.dtype == np.float16 and emb.ndim == 2 and emb.shape[1] == 32 and emb.shape[0] >= 3
        meta = json.loads(sample["json"])
        assert meta["key"] == key and sanitise_key(meta["raw_key"])[0] == key
        assert meta["frames"] == 8 and meta["height"] == 16 and meta["orig_width"] == 32
        with av.open(io.BytesIO(sample["mp4"])) as c:
            assert c.streams.video[0].codec_context.name == "h264"
            vid = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        assert vid.shape == (8, 16, 16, 3)
    assert seen == dataset["good"]


def test_every_bad_input_is_recorded_with_key_and_reason(first_run, dataset):
    out, _ = first_run
    failures: dict[str, set[str]] = {}
    total_by_reason: dict[str, int] = {}
    for p in sorted(out.glob("shard-*.json")):
        st = json.loads(p.read_text())
        for f in st["failures"]:
            failures.setdefault(f["reason"], set()).add(f["key"])
            assert isinstance(f["row"], int)
        for r, n in st["by_reason"].items():
            total_by_reason[r] = total_by_reason.get(r, 0) + n
        assert st["ok"] + st["failed"] == st["rows"][1] - st["rows"][0]
    assert failures == EXPECTED_FAILURES
    assert total_by_reason == {r: len(k) for r, k in EXPECTED_FAILURES.items()}


def test_tar_members_are_deterministic_tar_entries(first_run):
    out, _ = first_run
    with tarfile.open(out / "shard-000000.tar") as tf:
        members = tf.getmembers()
        assert members and all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
        names = [m.name for m in members]
        assert names[:4] == [f"{names[0].split('.')[0]}.{e}" for e in ("txt", "emb.npy", "mp4", "json")]
        assert tf.extractfile(members[0]).read().decode("utf-8")
    assert not list(out.glob("*.tmp-*"))


def test_rerun_skips_finished_and_redoes_unfinished_shards(first_run, dataset, tiny_bert_dir, tmp_path, capsys):
    out, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (out / "shard-000001.json").unlink()  # as if killed between the tar rename and the stats write
    (out / "shard-000002.tar.tmp-99999").write_bytes(b"half a shard")  # leftover of a killed writer
    assert _run(tmp_path, tiny_bert_dir, dataset["manifest"], out) == 0
    err = capsys.readouterr().err
    assert "1 to do" in err and "removed 1 temp files" in err
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]
    assert after["shard-000001.tar"] != before["shard-000001.tar"]
    assert (out / "shard-000001.json").exists() and not list(out.glob("*.tmp-*"))


def test_two_runs_are_byte_identical_and_manifest_formats_agree(first_run, dataset, tiny_bert_dir, tmp_path):
    out1, _ = first_run
    import pyarrow as pa
    import pyarrow.parquet as pq

    # same rows as parquet (captions as binary so the non-UTF-8 one survives)
    keys, urls, caps = zip(*[(k, u, c if isinstance(c, bytes) else c.encode()) for k, u, c in dataset["rows"]])
    pq.write_table(pa.table({"videoid": list(keys), "contentUrl": list(urls), "name": pa.array(caps, pa.binary())}),
                   tmp_path / "m.parquet")
    assert _run(tmp_path, tiny_bert_dir, tmp_path / "m.parquet", tmp_path / "out_pq") == 0
    assert_identical_shards(tmp_path / "out_pq", out1)


def test_failure_ratio_sets_exit_code_and_summary(dataset, tiny_bert_dir, tmp_path, capsys):
    code = _run(tmp_path, tiny_bert_dir, dataset["manifest"], tmp_path / "out", "--max-failure-ratio", "0.1")
    assert code == 1
    assert "FAILED: failure ratio" in capsys.readouterr().out
    # the same data with a lenient ratio passes (shards are reused, nothing recomputed)
    assert _run(tmp_path, tiny_bert_dir, dataset["manifest"], tmp_path / "out", "--max-failure-ratio", "0.9") == 0


def test_npy_storage_and_jsonl_manifest(synthetic_videos, tiny_bert_dir, tmp_path):
    rows = list(csv.DictReader(open(synthetic_videos, encoding="utf-8")))[:3]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _run(tmp_path, tiny_bert_dir, tmp_path / "m.jsonl", tmp_path / "out", "--set", "storage.format=npy",
                "--set", "clip.clips_per_video=2", "--set", "clip.fps=16") == 0
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    # 16 frames at 8 fps = 2 s; clips of 8 frames at 16 fps = 0.5 s → 2 clips each
    assert sorted(s["__key__"] for s in samples) == sorted(f"{r['key']}_{i:03d}" for r in rows for i in (0, 1))
    arr = np.load(io.BytesIO(samples[0]["frames.npy"]), allow_pickle=False)
    assert arr.dtype == np.uint8 and arr.shape == (8, 16, 16, 3)
    assert json.loads((tmp_path / "out" / "index.json").read_text())["format"] == "npy"


def test_config_errors_exit_2(tiny_bert_dir, tmp_path, capsys):
    assert main(["--manifest", "x.csv", "--set", "clip.nope=1"]) == 2
    assert "clip.nope" in capsys.readouterr().err
    assert main(["--manifest", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"),
                 "--encoder", tiny_bert_dir]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_real_minilm_encoder_embeddings_match_text_encoder(synthetic_videos, tmp_path):
    from model.text_encoder import TextEncoder

    rows = list(csv.DictReader(open(synthetic_videos, encoding="utf-8")))[:2]
    (tmp_path / "m.csv").write_text("key,path,caption\n" + "".join(f"{r['key']},{r['path']},{r['caption']}\n"
                                                                   for r in rows))
    assert main(["--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--encoder", "minilm",
                 "--no-progress", "--set", "clip.frames=8", "--set", "clip.height=16", "--set", "clip.width=16",
                 "--set", "encoder.batch_size=2"]) == 0
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    ref = TextEncoder("minilm").encode([r["caption"] for r in rows])
    for s, r in zip(samples, ref):
        emb = np.load(io.BytesIO(s["emb.npy"]), allow_pickle=False)
        assert emb.shape == r.shape and emb.shape[1] == 384
        assert np.array_equal(emb, r)
    assert json.loads((tmp_path / "out" / "index.json").read_text())["encoder"] == {"name": "minilm", "dim": 384}


def test_retry_transient_redoes_only_shards_with_network_failures(first_run, dataset, tiny_bert_dir, tmp_path,
                                                                   capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    transient = []
    for p in sorted(out.glob("shard-*.json")):
        st = json.loads(p.read_text())
        if {"timeout", "http_500"} & set(st["by_reason"]):
            transient.append(p.name)
    assert transient and len(transient) < len(list(out.glob("shard-*.json")))
    assert _run(tmp_path, tiny_bert_dir, dataset["manifest"], out, "--retry-transient") == 0
    assert f"{len(transient)} to do" in capsys.readouterr().err


def test_slurm_flags_map_to_config_and_missing_slurm_is_a_clear_error(synthetic_videos, tiny_bert_dir, tmp_path,
                                                                      monkeypatch, capsys):
    from data_pipeline.shard import build_parser, config_from_args

    args = build_parser().parse_args(["--manifest", "m.csv", "--slurm", "--partition", "gpu", "--nodes", "4",
                                      "--time", "90", "--cpus-per-task", "8", "--gpus-per-node", "1",
                                      "--array-tasks", "32", "--set", "encoder.device=cuda"])
    cfg = config_from_args(args)
    assert (cfg.slurm.partition, cfg.slurm.nodes, cfg.slurm.time_min, cfg.slurm.cpus_per_task,
            cfg.slurm.gpus_per_node, cfg.slurm.array_tasks, cfg.encoder.device) == ("gpu", 4, 90, 8, 1, 32, "cuda")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/srun
    assert main(["--manifest", synthetic_videos, "--out", str(tmp_path / "o"), "--encoder", tiny_bert_dir,
                 "--slurm", "--no-progress"]) == 2
    assert "--slurm:" in capsys.readouterr().err  # one clear line, no traceback


def test_a_shard_that_cannot_be_written_is_left_unfinished_and_exit_is_2(synthetic_videos, tiny_bert_dir, tmp_path,
                                                                          capsys, caplog):
    out = tmp_path / "out"
    out.mkdir()
    # a directory where shard 1's tar must go: os.replace fails for that shard only
    (out / "shard-000001.tar").mkdir()
    code = _run(tmp_path, tiny_bert_dir, synthetic_videos, out, "--samples-per-shard", "4")
    captured = capsys.readouterr()
    assert code == 2
    assert "shard 1 failed" in caplog.text and "UNFINISHED shards: [1]" in captured.out
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is False and [s["name"] for s in index["shards"]] == ["shard-000000.tar",
                                                                                   "shard-000002.tar"]
    assert not list(out.glob("*.tmp-*"))
    (out / "shard-000001.tar").rmdir()
    assert _run(tmp_path, tiny_bert_dir, synthetic_videos, out, "--samples-per-shard", "4") == 0
    assert json.loads((out / "index.json").read_text())["total"] == 12
