"""Shared pieces of the trainer tests: real tiny shards (synthetic mp4 → data_pipeline.shard CLI with a
tiny BERT), a tiny model config, and a runner for `python -m trainer.train` / torchrun subprocesses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import process_group
import yaml
from process_group import MULTI_PROCESS_TIMEOUT_S

from testing.fault_injection import ENV_VARS as FAULT_ENV_VARS
from testing.fault_injection import SPEC as FAULTS

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    for k in FAULT_ENV_VARS:
        env.pop(k, None)
    env.update(extra)
    return env


def make_trainer_shards(tmp_path_factory, tiny_bert_dir: str) -> tuple[str, str]:
    """(shards dir, encoder dir): 12 real h264 clips of 4 frames 8x8 in 3 shards, tiny-BERT captions.

    Made once per test session, by the `trainer_shards` fixture in conftest.py.
    """
    from data_pipeline.synthetic import make_synthetic_videos

    root = tmp_path_factory.mktemp("trainer_data")
    manifest = make_synthetic_videos(root / "videos", n=12, frames=8, size=16, fps=8, seed=1)
    out = root / "shards"
    cmd = [PY, "-m", "data_pipeline.shard", "--manifest", manifest, "--out", str(out), "--encoder", tiny_bert_dir,
           "--workers", "1", "--samples-per-shard", "4", "--no-progress", "--set", "clip.frames=4",
           "--set", "clip.height=8", "--set", "clip.width=8", "--set", "clip.too_short=pad"]
    r = process_group.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((out / "index.json").read_text())["total"] == 12
    return str(out), tiny_bert_dir


def tiny_config(path: Path, shards: str, out_dir: Path, **sections) -> Path:
    """A tiny-model training config (8x8, 4+1 frames, 16 channels) written to `path`. It carries the
    fault-injection callback, so a test's VDM_TEST_* variables (testing/fault_injection.py) take effect."""
    cfg = {
        "model": {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "image_size": 8,
                  "attention_resolutions": [4], "head_dim": 8, "cond_dim": 32, "text_dim": 32, "groups": 4},
        "diffusion": {"prediction": "v", "loss_weighting": "v_mse"},
        "sampling": {"steps": 2, "guidance_weight": 1.0},
        "data": {"shards": shards, "num_frames": 4, "image_size": 8, "num_image_frames": 1, "batch_size": 2,
                 "num_workers": 0, "shuffle_buffer": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "parallel": {"strategy": "single"},
        "run": {"out_dir": str(out_dir), "steps": 4, "precision": "fp32", "log_every": 1, "ckpt_every": 2,
                "ema_decay": 0.9, "caption_dropout": 0.5, "callbacks": [FAULTS]},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(config: Path, *sets: str, nproc: int = 1) -> list[str]:
    args = ["--config", str(config)] + [a for s in sets for a in ("--set", s)]
    if nproc == 1:
        return [PY, "-m", "trainer.train", *args]
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "trainer.train", *args]


def run_train(config: Path, *sets: str, nproc: int = 1, timeout: float | None = None, **env: str):
    """`trainer.train` on `config`; the timeout defaults to 180 s for one process and to
    process_group.MULTI_PROCESS_TIMEOUT_S under torchrun."""
    if timeout is None:
        timeout = MULTI_PROCESS_TIMEOUT_S if nproc > 1 else 180
    return process_group.run(train_cmd(config, *sets, nproc=nproc), cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def step_log(out_dir: Path) -> dict[int, dict]:
    """Last logged record per step (a resumed run re-logs the steps after its checkpoint)."""
    records: dict[int, dict] = {}
    for line in (Path(out_dir) / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records[rec["step"]] = rec
    return records


def saved_tensors(ckpt_dir: Path, part: str) -> dict:
    """Full tensors of a checkpoint's `model`, `ema` or `optim.state` (DCP, keyed by parameter name;
    `optim.state` as `<name>.exp_avg` ...), read in this process whatever world size wrote them."""
    from trainer.strategies.dcp_state import read_full

    return read_full(Path(ckpt_dir), part)


def assert_same_ema(a_run: Path, b_run: Path, step: int, world_size: int = 1) -> None:
    """The EMA of checkpoint `step` in two runs holds bitwise-equal tensors (the loss and grad norm
    of a resumed run do not depend on the EMA, so only this catches a resume that drops it). In the
    DCP state (single/ddp/fsdp) or, for deepspeed, in the per-rank ema-rank{r}.pt files."""
    import torch

    from trainer.checkpoint import has_dcp_ema

    name = f"step-{step:06d}"
    a_dir, b_dir = Path(a_run) / "checkpoints" / name, Path(b_run) / "checkpoints" / name
    if has_dcp_ema(a_dir):
        a, b = saved_tensors(a_dir, "ema"), saved_tensors(b_dir, "ema")
        assert sorted(a) == sorted(b) and len(a) > 0
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        assert not bad, f"{name}: EMA differs after resume in {bad[:5]}"
        return
    for r in range(world_size):
        a = torch.load(a_dir / f"ema-rank{r}.pt", weights_only=True)
        b = torch.load(b_dir / f"ema-rank{r}.pt", weights_only=True)
        assert len(a) == len(b) > 0, (r, len(a), len(b))
        bad = [i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)]
        assert not bad, f"{name}: EMA of rank {r} differs after resume in tensors {bad[:5]}"


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def wait_for_line(proc: subprocess.Popen, text: str, lines: list[str], timeout: float = 150) -> None:
    """Read a trainer subprocess's output until a line contains `text` (kill it and fail on timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if text in line:
            return
    proc.kill()
    raise AssertionError(f"never saw {text!r}; output:\n{''.join(lines)}")


def run_in_group(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """A command of ours from the repository root with the tests' environment; on timeout its whole
    process group is killed (tests/process_group.py) and the test fails with the output so far."""
    try:
        return process_group.run(cmd, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True,
                                 timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{e.output}\n{e.stderr}") from None


def torchrun_cmd(script: str, nproc: int, *args: str) -> list[str]:
    """`script` (a path, or `-m module`) under torchrun with nproc processes, or plainly for one."""
    target = script.split() if script.startswith("-m ") else [script]
    if nproc == 1:
        return [PY, *target, *args]
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target, *args]
