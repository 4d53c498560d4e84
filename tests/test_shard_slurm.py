"""`data_pipeline.shard --slurm` on the real local SLURM cluster: a submitit array job whose shards
are byte-identical to a local run's (needs slurm/local_cluster.sh up; fails under CI=true without)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from shard_helpers import assert_identical_shards
from slurm_helpers import REPO, require_cluster

from data_pipeline.shard import main

pytestmark = pytest.mark.slurm


def test_slurm_array_matches_local_run(synthetic_videos, tiny_bert_dir, tmp_path):
    require_cluster(min_nodes=1)
    common = ["--manifest", synthetic_videos, "--encoder", tiny_bert_dir, "--samples-per-shard", "3",
              "--set", "clip.frames=8", "--set", "clip.height=16", "--set", "clip.width=16", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "data_pipeline.shard", *common, "--out", str(tmp_path / "slurm"),
                        "--slurm", "--array-tasks", "2", "--nodes", "2", "--cpus-per-task", "1", "--time", "5"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted 2 array tasks for 4 shards" in r.stderr
    local = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").glob("shard-*.tar"))}
    slurm = {p.name: p.read_bytes() for p in sorted((tmp_path / "slurm").glob("shard-*.tar"))}
    assert len(local) == 4
    assert slurm.keys() == local.keys()
    assert_identical_shards(tmp_path / "slurm", tmp_path / "local")
    assert json.loads((tmp_path / "slurm" / "index.json").read_text())["total"] == 12
    assert list((tmp_path / "slurm" / "slurm_logs").iterdir())  # submitit's per-job log folder
    # a rerun finds everything finished and submits nothing
    r2 = subprocess.run([sys.executable, "-m", "data_pipeline.shard", *common, "--out", str(tmp_path / "slurm"),
                         "--slurm"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and "4 already finished, 0 to do" in r2.stderr and "submitted" not in r2.stderr
