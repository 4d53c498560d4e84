"""Parallel paths: spawned local workers, the submitit array path, and SIGKILL at any moment."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from shard_helpers import VideoServer, assert_identical_shards

from common.config import from_dict
from data_pipeline.config import ShardConfig
from data_pipeline.shard import main, run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, manifest, out, tiny_bert_dir, **kw) -> Path:
    cfg = {"manifest": str(manifest), "out_dir": str(out), "samples_per_shard": 3,
           "clip": {"frames": 8, "fps": 8, "height": 16, "width": 16},
           "encoder": {"name_or_path": tiny_bert_dir, "batch_size": 2}, "max_failure_ratio": 0.0}
    cfg.update(kw)
    p = tmp_path / f"cfg_{Path(out).name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("shard-*.tar"))}


def test_spawned_workers_and_array_path_match_single_process(synthetic_videos, tiny_bert_dir, tmp_path):
    one = tmp_path / "one"
    assert main(["--config", str(_cfg(tmp_path, synthetic_videos, one, tiny_bert_dir)), "--no-progress"]) == 0
    two = tmp_path / "two"
    assert main(["--config", str(_cfg(tmp_path, synthetic_videos, two, tiny_bert_dir)), "--workers", "2",
                 "--no-progress"]) == 0
    assert len(_tars(one)) == 4
    assert_identical_shards(two, one)
    # the --slurm code path (submitit array, index merge) on submitit's local cluster
    arr = tmp_path / "array"
    cfg = from_dict(ShardConfig, yaml.safe_load(_cfg(tmp_path, synthetic_videos, arr, tiny_bert_dir).read_text()))
    cfg.slurm.cluster, cfg.slurm.array_tasks = "local", 2
    summary = run(cfg, slurm=True, progress=False)
    assert summary.failed == 0 and summary.samples == 12 and not summary.missing_shards
    assert_identical_shards(arr, one)
    assert (arr / "index.json").read_text() == (one / "index.json").read_text()


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (forkserver, its workers, the resource tracker), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (it waits for its reaper)


def test_sigkill_mid_run_then_rerun_has_every_video_exactly_once(synthetic_videos, tiny_bert_dir, tmp_path):
    """Only the CLI's pid is killed (as the OOM killer does): its forkserver and workers exit within a
    few seconds by themselves, and the rerun finishes the work exactly."""
    rows = list(csv.DictReader(open(synthetic_videos, encoding="utf-8")))
    files = {f"/{r['key']}.mp4": Path(r["path"]).read_bytes() for r in rows}
    with VideoServer(files) as srv:
        # 24 rows, 2 per shard; every row is served slowly (0.3 s) so the run is long enough to kill
        manifest = tmp_path / "m.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "path", "caption"])
            for rep in range(2):
                for r in rows:
                    w.writerow([f"{r['key']}r{rep}", f"{srv.url}/slow/{r['key']}.mp4", r["caption"]])
        out = tmp_path / "out"
        cfg = _cfg(tmp_path, manifest, out, tiny_bert_dir, samples_per_shard=2)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.shard", "--config", str(cfg),
                                 "--workers", "2", "--no-progress"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list(out.glob("shard-*.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.4)  # land somewhere inside a later shard
        run_pids = _children(proc.pid)
        assert len(run_pids) >= 3, run_pids  # forkserver + 2 workers (+ resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = len(list(out.glob("shard-*.json")))
        assert 2 <= done_before < 12, done_before  # really interrupted mid-run
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in run_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in run_pids if _alive(p)]
        for p in left:  # leave nothing behind even when the assertion fails
            os.kill(p, signal.SIGKILL)
        assert not left, f"processes of the killed run still alive 5 s later: {left}"
        assert main(["--config", str(cfg), "--no-progress"]) == 0
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("shard-*.tar")),
                                                 shardshuffle=False)]
    assert sorted(keys) == sorted(f"{r['key']}r{rep}" for rep in range(2) for r in rows)
    assert len(keys) == len(set(keys))
    assert not list(out.glob("*.tmp-*"))
