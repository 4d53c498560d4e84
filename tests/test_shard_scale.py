"""Per-row cost at scale: shard JSONs whose summary is read without the failure list, an index
merge that accounts for every row, and a real run of many fast-failing rows with 2 workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_pipeline.stats import ShardStats, done_summary, merge_index, read_stats, read_summary, write_stats
from data_pipeline.writer import shard_name, stats_name, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def _stats(shard: int, n_failed: int, rows_per_shard: int = 1000) -> ShardStats:
    start = shard * rows_per_shard
    st = ShardStats(shard=shard, rows=(start, start + rows_per_shard), config_hash="h" * 16,
                    encoder={"name": "enc", "dim": 8}, ok=rows_per_shard - n_failed,
                    samples=rows_per_shard - n_failed, tar_bytes=10240)
    for i in range(n_failed):
        st.fail(start + i, f"key{start + i}", "not_found" if i % 3 else "http_404",
                f'no such file /videos/{start + i}.mp4 "quoted", newline\n and ünïcode')
    return st


def test_shard_json_is_json_and_its_summary_is_its_first_line(tmp_path):
    st = _stats(3, 50)
    write_stats(tmp_path, st)
    full = read_stats(tmp_path, 3)
    assert full == json.loads(json.dumps(st.to_json()))  # whole file: ordinary JSON, every failure
    assert len(full["failures"]) == 50 and full["failures"][0]["detail"].endswith("ünïcode")
    summary = read_summary(tmp_path, 3)
    assert summary == {k: v for k, v in full.items() if k != "failures"}
    assert summary["by_reason"] == {"http_404": 17, "not_found": 33}
    # the summary really comes from the first line alone: damage after it does not reach it
    path = tmp_path / stats_name(3)
    lines = path.read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join([lines[0], "<<not json>>"] + lines[2:]), encoding="utf-8")
    assert read_stats(tmp_path, 3) is None and read_summary(tmp_path, 3) == summary
    # a shard JSON in the earlier layout (one indented object) is still read, whole
    write_json_atomic(tmp_path / stats_name(4), _stats(4, 5).to_json())
    old = read_summary(tmp_path, 4)
    assert old["failed"] == 5 and "failures" not in old


def test_merge_accounts_for_every_row_and_every_missing_shard(tmp_path):
    n_shards, per = 300, 40
    for s in range(n_shards):
        if s == 17:
            continue  # never finished
        st = _stats(s, per if s % 2 else 3, rows_per_shard=per)
        if s == 23:
            st.config_hash = "another-config"  # made with other settings: not this run's
        write_stats(tmp_path, st)
        (tmp_path / shard_name(s)).write_bytes(b"\0" * (10240 if s != 29 else 512))  # 29: a cut tar
    assert done_summary(tmp_path, 29, "h" * 16) is None and done_summary(tmp_path, 30, "h" * 16)
    summary = merge_index(tmp_path, n_shards, "h" * 16, {"frames": 8}, "mp4")
    assert summary.missing_shards == [17, 23, 29]
    done = [s for s in range(n_shards) if s not in (17, 23, 29)]
    failed = sum(per if s % 2 else 3 for s in done)
    assert summary.rows == per * len(done) and summary.failed == failed
    assert summary.ok == summary.rows - failed and sum(summary.by_reason.values()) == failed
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["name"] for e in index["shards"]] == [shard_name(s) for s in done]
    assert index["failed"] == failed and index["complete"] is False
    assert index["total"] == sum(e["count"] for e in index["shards"]) == summary.samples


@pytest.mark.slow
def test_many_fast_failing_rows_with_two_workers(tmp_path, tiny_bert_dir):
    """3000 rows of missing files in 100 shards, 2 real worker processes: every row is in the index
    as a failure with its reason, and the log has a bounded number of lines per shard."""
    n, per = 3000, 30
    manifest = tmp_path / "m.csv"
    with open(manifest, "w") as f:
        f.write("videoid,contentUrl,duration,page_dir,name\n")
        f.writelines(f"{i},{tmp_path}/missing/{i}.mp4,PT00H00M10S,000,a caption number {i}\n" for i in range(n))
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"manifest": str(manifest), "out_dir": str(out), "samples_per_shard": per,
                                   "clip": {"frames": 8, "fps": 8, "height": 16, "width": 16},
                                   "encoder": {"name_or_path": tiny_bert_dir}, "max_failure_ratio": 1.0}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", str(cfg), "--workers", "2",
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is True and index["failed"] == n and index["total"] == 0
    assert len(index["shards"]) == n // per
    assert f"{n} rows → 0 videos ok" in proc.stdout and f"not_found: {n}" in proc.stdout
    rows = sorted(f["row"] for s in range(n // per) for f in read_stats(out, s)["failures"])
    assert rows == list(range(n))
    row_lines = [ln for ln in proc.stderr.splitlines() if "not_found no such file" in ln]
    assert len(row_lines) == 10 * (n // per)  # the first 10 rows of each shard, then one line per shard:
    shard_lines = [ln for ln in proc.stderr.splitlines() if f"of {per} rows failed (not_found {per})" in ln]
    assert len(shard_lines) == n // per
    # a rerun finds every shard finished, reuses the mapped manifest and rewrites the same index
    (out / "index.json").unlink()
    cache = sorted((out / ".manifest").iterdir())
    again = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", str(cfg), "--workers", "2",
                            "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"{n // per} already finished, 0 to do" in again.stderr
    assert json.loads((out / "index.json").read_text()) == index
    assert sorted((out / ".manifest").iterdir()) == cache
