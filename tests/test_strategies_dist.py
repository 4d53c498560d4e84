"""FSDP2 and DeepSpeed ZeRO-1/2/3 for real: 2 processes over gloo on CPU, launched by torchrun.

Each case is two launches of tests/strategy_driver.py on a tiny SpaceTimeUNet: an uninterrupted
run that also checkpoints halfway, and a fresh pair of processes resuming from that checkpoint.
Reused for several assertions: training moves the loss, a NaN batch is skipped without touching the
weights, exact (bitwise) resume of losses, grad norms, weights and EMA, EMA of the local shards equals
a hand computation on the gathered full weights, and the gathered initial weights equal the
unsharded model's for the same seed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import process_group
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "strategy_driver.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS, SAVE_AT, NAN_STEP, ZERO_LR_STEP, DECAY, CLIP = 5, 3, 1, 2, 0.9, 0.1  # step 0's grad norm is ~0.3

CASES = {
    "fsdp-bf16": ["--strategy", "fsdp", "--precision", "bf16"],
    "zero1-fp32": ["--strategy", "deepspeed", "--zero-stage", "1", "--precision", "fp32"],
    "zero2-bf16-accum2": ["--strategy", "deepspeed", "--zero-stage", "2", "--precision", "bf16", "--accum", "2"],
    "zero3-bf16": ["--strategy", "deepspeed", "--zero-stage", "3", "--precision", "bf16"],
}


def torchrun(args: list[str], timeout: float = process_group.MULTI_PROCESS_TIMEOUT_S) -> None:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(DRIVER), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = process_group.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """Run once per strategy: straight run (checkpoint at SAVE_AT) + resumed run from that checkpoint."""
    name = request.param
    d = tmp_path_factory.mktemp(name)
    common = [*CASES[name], "--steps", str(STEPS), "--nan-step", str(NAN_STEP), "--zero-lr-step", str(ZERO_LR_STEP),
              "--ema-decay", str(DECAY), "--grad-clip", str(CLIP)]
    torchrun([*common, "--save-at", str(SAVE_AT), "--ckpt", str(d / "ckpt"), "--dump", str(d / "full"),
              "--dump-steps", "--probe", "--out", str(d / "full.json")])
    torchrun([*common, "--resume", str(d / "ckpt"), "--dump", str(d / "resumed"), "--out", str(d / "resumed.json")])
    return name, d, json.loads((d / "full.json").read_text()), json.loads((d / "resumed.json").read_text())


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_trains_and_skips_the_nan_step(case):
    name, d, full, _ = case
    losses = full["losses"]
    assert len(losses) == STEPS
    assert full["skipped"] == [NAN_STEP]
    assert not math.isfinite(full["grad_norms"][NAN_STEP])
    finite = [x for i, x in enumerate(losses) if i != NAN_STEP]
    assert all(math.isfinite(x) for x in finite) and len(set(finite)) == len(finite), losses
    before, after = _load(d / "full" / f"step{NAN_STEP - 1}.pt"), _load(d / "full" / f"step{NAN_STEP}.pt")
    assert all(torch.equal(before[k], after[k]) for k in before), f"{name}: the NaN step changed weights"
    # set_lr reaches the optimizer: with lr 0 (and no weight decay) a finite step moves nothing
    assert math.isfinite(full["grad_norms"][ZERO_LR_STEP])
    zero_before, zero_after = _load(d / "full" / f"step{ZERO_LR_STEP - 1}.pt"), _load(d / "full" / f"step{ZERO_LR_STEP}.pt")
    assert all(torch.equal(zero_before[k], zero_after[k]) for k in zero_before), f"{name}: lr=0 step moved weights"
    last = _load(d / "full" / f"step{STEPS - 1}.pt")
    assert any(not torch.equal(before[k], last[k]) for k in before), f"{name}: training changed nothing"
    # and it learned: the loss over the run's own batches (same t and noise) fell
    probe_before, probe_after = full["probe_loss"]
    assert probe_after < 0.995 * probe_before, (name, probe_before, probe_after)  # ~1% in 3 updates


def test_clip_bounds_the_gradient_the_optimizer_consumes(case):
    """Step 0's pre-clip norm is above CLIP: the gradient AdamW consumed (read back
    from its first moment, over both ranks' shards) must have norm exactly the clip."""
    name, _, full, _ = case
    clip, prenorm = full["grad_clip"], full["grad_norms"][0]
    assert clip == CLIP
    assert prenorm > 1.5 * clip, f"{name}: step 0 would not be clipped ({prenorm} <= {clip}); raise the check"
    assert full["first_consumed_grad_norm"] == pytest.approx(clip, rel=1e-4), name


def test_resume_is_bitwise_exact(case):
    name, d, full, resumed = case
    assert resumed["losses"] == full["losses"][SAVE_AT:], name
    assert resumed["grad_norms"] == full["grad_norms"][SAVE_AT:], name
    for fname in ("final.pt", "ema.pt"):
        a, b = _load(d / "full" / fname), _load(d / "resumed" / fname)
        assert list(a) == list(b)
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        assert not bad, f"{name}: {fname} differs after resume in {bad[:5]}"


def test_ema_of_local_shards_matches_hand_computation(case):
    name, d, full, _ = case
    shadow = {k: v.clone() for k, v in _load(d / "full" / "init.pt").items()}
    for step in range(STEPS):
        if step in full["skipped"]:
            continue
        w = _load(d / "full" / f"step{step}.pt")
        for k in shadow:
            shadow[k].mul_(DECAY).add_(w[k], alpha=1 - DECAY)
    ema = _load(d / "full" / "ema.pt")
    for k in shadow:
        torch.testing.assert_close(ema[k], shadow[k], rtol=0, atol=1e-7, msg=lambda m, k=k: f"{name} {k}: {m}")
    final = _load(d / "full" / "final.pt")
    assert any(not torch.equal(ema[k], final[k]) for k in ema)  # the EMA is not just the live weights


def test_state_is_sharded_and_gathers_to_the_unsharded_init(case):
    name, d, full, _ = case
    sys.path.insert(0, str(ROOT / "tests"))
    from strategy_driver import tiny_unet

    from model.unet import SpaceTimeUNet

    torch.manual_seed(0)
    reference = SpaceTimeUNet(tiny_unet("tiny")).state_dict()
    init = _load(d / "full" / "init.pt")
    assert list(init) == list(reference)
    assert all(torch.equal(init[k], reference[k].float()) for k in reference), name
    ranks = full["ranks"]
    total = full["full_numel"]
    # each rank holds about half the fp32 master (and so half the EMA); together all of it (+ padding)
    for r in ranks:
        assert r["local_param_numel"] <= total / 2 + 0.1 * total, (name, r["local_param_numel"], total)
    assert total <= sum(r["local_param_numel"] for r in ranks) <= total * 1.1



def _one_process(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return process_group.run([sys.executable, str(DRIVER), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=process_group.MULTI_PROCESS_TIMEOUT_S)


def test_one_process_fsdp_fp16_scales_and_skips(tmp_path):
    """Sharded strategies also start without torchrun (a private one-rank group); fp16 loss scaling
    survives a NaN step (skipped, then training continues with finite losses)."""
    out = tmp_path / "r.json"
    proc = _one_process(["--strategy", "fsdp", "--precision", "fp16", "--steps", "3", "--nan-step", "1",
                         "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["world"] == 1 and r["skipped"] == [1]
    assert math.isfinite(r["losses"][2]) and math.isfinite(r["grad_norms"][2])


def test_deepspeed_fp16_on_cpu_is_refused_clearly(tmp_path):
    proc = _one_process(["--strategy", "deepspeed", "--precision", "fp16", "--steps", "1",
                         "--out", str(tmp_path / "r.json")])
    assert proc.returncode != 0
    assert "run.precision=fp16 with deepspeed needs a GPU" in proc.stderr


def test_fsdp_with_checkpointing_trains_like_ddp(tmp_path):
    """Same init, same data, fp32: DDP and FSDP2 (+ gradient checkpointing) see the same losses and end
    at the same weights (gathered from the shards), up to summation order in the reductions."""
    runs = {}
    for name, extra in {"ddp": ["--strategy", "ddp"], "fsdp": ["--strategy", "fsdp", "--grad-ckpt"]}.items():
        torchrun([*extra, "--precision", "fp32", "--steps", "3", "--dump", str(tmp_path / name),
                  "--out", str(tmp_path / f"{name}.json")])
        runs[name] = (json.loads((tmp_path / f"{name}.json").read_text()), _load(tmp_path / name / "final.pt"))
    (a, wa), (b, wb) = runs["ddp"], runs["fsdp"]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-6, abs=0)
    assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-5, abs=0)
    assert list(wa) == list(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
