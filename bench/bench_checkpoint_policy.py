"""Activation checkpoint policies side by side: saved activations, peak memory, FLOPs and step time.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_checkpoint_policy            # small, CPU
    .venv/bin/python -m bench.bench_checkpoint_policy --device cuda --precision bf16 --steps 5      # on a GPU
    .venv/bin/python -m bench.bench_checkpoint_policy --no-time                                     # meta only

For each `model.checkpoint_policy`, at the config's clip geometry and batch 1 (T video frames, 16
caption tokens), one forward + backward (U-Net output, mean-square loss):

- saved activations: bytes alive after forward (what is kept for backward), and the peak of tensor
  bytes alive during forward + backward, both measured on the meta device with
  trainer.perf.ActivationMemory (storages watched by a dispatch mode, so the selective policy's own
  cache counts too; parameters and inputs excluded, gradients included in the peak). Exact, portable
  and free: the figure to compare policies by on any machine.
- model / hardware FLOPs: trainer.perf.count_step_flops without and with the policy (recompute).
- step time and measured peak memory: a real step in a fresh subprocess per policy. On CUDA the peak
  is torch.cuda.max_memory_allocated minus the allocation before the step; on CPU it is the growth of
  peak RSS during the step (the allocator's and the kernels' scratch included), noisier.

Writes a markdown table (stdout, or --out FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.config import load_config
from model.unet import CHECKPOINT_POLICIES, SpaceTimeUNet
from trainer.config import TrainConfig
from trainer.perf import ActivationMemory, BatchGeometry, count_step_flops

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENS = 16
GiB = 2**30


def _cfg(config: str, policy: str, every_k: int) -> TrainConfig:
    return load_config(TrainConfig, ROOT / config, [f"model.checkpoint_policy={policy}",
                                                    "model.gradient_checkpointing=false",
                                                    f"model.checkpoint_every_k={every_k}"])


def _inputs(cfg: TrainConfig, device) -> tuple:
    m, d = cfg.model, cfg.data
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, m.in_channels, d.num_frames, m.image_size, m.image_size, generator=g)
    text = torch.randn(1, TEXT_TOKENS, m.text_dim, generator=g)
    return z.to(device), torch.zeros(1, device=device), text.to(device)


def meta_case(cfg: TrainConfig) -> dict:
    """Saved/peak activation bytes and FLOPs of one step on the meta device (no compute)."""
    with torch.device("meta"):
        model = SpaceTimeUNet(cfg.model).train()
        z = torch.empty(1, cfg.model.in_channels, cfg.data.num_frames, cfg.model.image_size, cfg.model.image_size)
        text = torch.empty(1, TEXT_TOKENS, cfg.model.text_dim)
        logsnr = torch.empty(1)
    with ActivationMemory() as mem:
        loss = model(z, logsnr, text, None).float().square().mean()
        mem.retained()
        loss.backward()
    geometry = BatchGeometry(1, cfg.data.num_frames, cfg.data.num_frames, cfg.model.image_size,
                             cfg.model.image_size, TEXT_TOKENS)
    policy = cfg.model.activation_checkpointing
    return {"saved_gib": mem.retained_bytes / GiB, "peak_sim_gib": mem.peak_bytes / GiB,
            "model_tflop": count_step_flops(cfg.model, geometry, "none") / 1e12,
            "hardware_tflop": count_step_flops(cfg.model, geometry, policy) / 1e12}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timed_case(cfg: TrainConfig, device: str, precision: str, warmup: int, steps: int) -> dict:
    """Real steps in this (fresh) process: wall and CPU seconds per step, measured peak memory."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = SpaceTimeUNet(cfg.model).train().to(dev)
    z, logsnr, text = _inputs(cfg, dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(z, logsnr, text, None).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: steady-state memory

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _peak_rss()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = (time.perf_counter() - t0) / steps, (_cpu_seconds() - c0) / steps
    peak = (torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else _peak_rss() - rss0) / GiB
    return {"step_s": wall, "cpu_s": cpu, "peak_measured_gib": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/vdm_t2v_small_16x64.yaml")
    p.add_argument("--policies", nargs="+", default=list(CHECKPOINT_POLICIES), choices=CHECKPOINT_POLICIES)
    p.add_argument("--every-k", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--no-time", action="store_true", help="meta-device figures only (seconds, no real step)")
    p.add_argument("--out", default="-")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one timed policy in a subprocess
    a = p.parse_args(argv)

    if a.case:
        print(json.dumps(timed_case(_cfg(a.config, a.case, a.every_k), a.device, a.precision, a.warmup, a.steps)))
        return 0

    rows = []
    for policy in a.policies:
        cfg = _cfg(a.config, policy, a.every_k)
        row = {"policy": policy, **meta_case(cfg)}
        if not a.no_time:
            cmd = [sys.executable, "-m", "bench.bench_checkpoint_policy", "--case", policy, "--config", a.config,
                   "--every-k", str(a.every_k), "--device", a.device, "--precision", a.precision,
                   "--warmup", str(a.warmup), "--steps", str(a.steps)]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
            if r.returncode != 0:
                raise SystemExit(f"{policy}: {r.stderr[-2000:]}")
            row.update(json.loads(r.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    base = next((r for r in rows if r["policy"] == "none"), rows[0])
    lines = [f"config {a.config}, batch 1, {a.device} {a.precision}, every_k k={a.every_k}, "
             f"{a.steps} timed step(s) after {a.warmup} warm-up", "",
             "| policy | saved activations (GiB) | peak tensors fwd+bwd (GiB, meta) | model TFLOP | hardware TFLOP "
             "(recompute) | step s | vs none | CPU s | measured peak (GiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        timed = (f"{r['step_s']:.1f} | {r['step_s'] / base['step_s']:.2f}x | {r['cpu_s']:.1f} | "
                 f"{r['peak_measured_gib']:.2f}" if "step_s" in r and "step_s" in base else "- | - | - | -")
        lines.append(f"| {r['policy']} | {r['saved_gib']:.2f} | {r['peak_sim_gib']:.2f} | {r['model_tflop']:.3f} | "
                     f"{r['hardware_tflop']:.3f} (+{100 * (r['hardware_tflop'] / r['model_tflop'] - 1):.0f}%) | "
                     f"{timed} |")
    text = "\n".join(lines) + "\n"
    if a.out == "-":
        print(text)
    else:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
