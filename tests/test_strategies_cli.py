"""The real `trainer.train` CLI with fsdp and DeepSpeed ZeRO-3 under torchrun (2 processes, gloo, CPU):
exact resume from a mid-run checkpoint in a fresh run directory, and `trainer.export` of the shards."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import process_group
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"

E2E_SETS = {
    "data.encoder": "fixture-encoder", "model.text_dim": 8, "model.base_channels": 8,
    "model.channel_mults": "[1,2]", "model.attention_resolutions": "[8]", "model.head_dim": 8,
    "model.cond_dim": 16, "model.groups": 4, "model.image_size": 16, "data.num_frames": 4,
    "data.image_size": 16, "data.num_image_frames": 1, "data.batch_size": 2, "data.num_workers": 1,
    "data.shuffle_buffer": 4, "run.steps": 4, "run.ckpt_every": 2, "run.keep_last": 3, "run.val_every": 0,
    "run.sample_every": 0, "run.log_every": 1, "run.precision": "bf16", "optim.warmup_steps": 1,
}


def _train(out_dir: Path, shards: Path, extra: dict, module: str = "trainer.train") -> str:
    sets = {**E2E_SETS, "data.shards": shards, "run.out_dir": out_dir, **extra}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", module, "--config",
           "configs/demo.yaml", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = process_group.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=process_group.MULTI_PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _log(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "train_log.jsonl").read_text().splitlines() if x]


@pytest.mark.parametrize("extra", [{"parallel.strategy": "fsdp"},
                                   {"parallel.strategy": "deepspeed", "parallel.zero_stage": 3,
                                    "parallel.deepspeed_config": "configs/deepspeed/zero3.json"}],
                         ids=["fsdp", "deepspeed-zero3"])
def test_trainer_cli_resumes_exactly_and_exports(tmp_path, extra):
    """trainer.train under torchrun: 4 steps straight (checkpoints at 2 and 4) vs a fresh run directory
    holding only the step-2 checkpoint, which resumes by itself; then trainer.export of the shards."""
    from test_loader import write_shards
    from trainer_helpers import assert_same_ema, saved_tensors

    shards = tmp_path / "shards"
    write_shards(shards, [6, 6], fmt="npy", frames=4, size=16)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, shards, extra)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    (resumed / "checkpoints" / "latest").write_text("step-000002\n")
    _train(resumed, shards, extra)
    a, b = _log(straight), _log(resumed)
    assert [r["step"] for r in a] == [0, 1, 2, 3] and [r["step"] for r in b] == [2, 3]
    assert [(r["loss"], r["grad_norm"]) for r in a[2:]] == [(r["loss"], r["grad_norm"]) for r in b]
    assert all(math.isfinite(r["loss"]) for r in a) and len({r["loss"] for r in a}) == 4
    assert_same_ema(straight, resumed, 4, world_size=2)  # the loss does not see the EMA

    out = tmp_path / "ema.safetensors"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "trainer.export",
           "--checkpoint", str(resumed), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = process_group.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=process_group.MULTI_PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file

    from common.config import from_dict
    from model.unet import SpaceTimeUNet
    from trainer.config import TrainConfig

    exported = load_file(str(out))
    cfg = from_dict(TrainConfig, json.loads((resumed / "checkpoints" / "step-000004" / "trainer_state.json")
                                            .read_text())["config"])
    model = SpaceTimeUNet(cfg.model)
    model.load_state_dict(exported)  # every key, every shape
    assert all(torch.isfinite(v).all() for v in exported.values())

    # the way out of a sharded checkpoint: its export warm-starts a run of another strategy (lr=0 keeps
    # the first step from moving the weights, so the new run's weights are exactly the export's)
    warm = tmp_path / "warm"
    stdout = _train(warm, shards, {"parallel.strategy": "ddp", "run.init_from": out, "optim.lr": 0.0,
                                   "run.steps": 1, "run.ckpt_every": 1})
    assert f"[init] model and EMA weights from {out} (step 4 of its run)" in stdout
    live = saved_tensors(warm / "checkpoints" / "step-000001", "model")
    assert set(live) == set(exported) and all(torch.equal(live[k], exported[k]) for k in exported)
