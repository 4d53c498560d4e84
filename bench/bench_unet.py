"""SpaceTimeUNet forward+backward cost per training step: time, peak memory, saved activations.

    .venv/bin/python -m bench.bench_unet                       # demo + small, writes bench/RESULTS_unet.md
    .venv/bin/python -m bench.bench_unet --configs demo --steps 5 --out -

Every case (config x precision x checkpointing) runs in its own fresh subprocess, so its peak RSS
is not polluted by an earlier, bigger case. Peak memory = peak RSS during the steps minus RSS just
before them (weights, inputs and the allocator's baseline excluded); on CPU that is what
activations, gradients and temporaries cost. Model FLOPs per step are counted once per config on the
meta device with torch.utils.flop_counter (no compute), so the achieved GFLOP/s can be compared with
a GPU run of the same config later.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.config import load_config
from model.unet import SpaceTimeUNet, count_parameters
from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "demo": "configs/demo.yaml",
    "small": "configs/vdm_t2v_small_16x64.yaml",
    "large": "configs/vdm_t2v_large_16x64.yaml",
    "9x128": "configs/vdm_t2v_9x128.yaml",
}
TEXT_TOKENS = 16
# (warmup, timed) steps per case. One forward+backward of the small config at 16x64x64 is ~5.5
# TFLOP (minutes on 2 CPU cores), so it gets a single timed step and no warmup: its tensors are far
# above glibc's mmap threshold, so every step (the first included) pays the same page faults.
DEFAULT_STEPS = {"demo": (2, 10), "small": (0, 1), "large": (0, 1), "9x128": (0, 1)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other processes
    sharing the cores (wall time then stretches, CPU time mostly does not)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _inputs(cfg: TrainConfig, device="cpu"):
    """Batch 1 at the config's clip geometry: T video frames (no extra image frames)."""
    m, d = cfg.model, cfg.data
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(1, m.in_channels, d.num_frames, m.image_size, m.image_size, generator=g).to(device)
    logsnr = torch.zeros(1, device=device)
    text = torch.randn(1, TEXT_TOKENS, m.text_dim, generator=g).to(device)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)
    return z, logsnr, text, mask


def model_flops(cfg: TrainConfig) -> int:
    """FLOPs of one forward+backward at batch 1, counted on the meta device (shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    # checkpointing off: recomputation is not model work and would inflate the count by ~25%
    with torch.device("meta"):
        model = SpaceTimeUNet(dataclasses.replace(cfg.model, checkpoint_policy="none",
                                                   gradient_checkpointing=False)).train()
        z, logsnr, text, mask = _inputs(cfg, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model(z, logsnr, text, mask).float().square().mean().backward()
    return counter.get_total_flops()


def run_case(config: str, precision: str, checkpointing: bool, warmup: int, steps: int) -> dict:
    """One case in this (fresh) process; returns the measurements."""
    cfg = load_config(TrainConfig, ROOT / CONFIGS[config],
                      [f"model.checkpoint_policy={'all' if checkpointing else 'none'}"])
    torch.manual_seed(0)
    model = SpaceTimeUNet(cfg.model).train()
    z, logsnr, text, mask = _inputs(cfg)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    def step(count_saved: bool = False):
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack if count_saved else (lambda t: t), lambda t: t):
            out = model(z, logsnr, text, mask)
        out.float().square().mean().backward()
        # free the grads: every step (also a first one without warmup) then allocates them anew,
        # so peak memory means the same thing for every case (activations + grads + temporaries)
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    rss_before = _rss_bytes()
    times, cpu_times = [], []
    for i in range(steps):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        step(count_saved=i == 0)  # the hook only sums tensor sizes: no measurable cost
        times.append(time.perf_counter() - t0)
        cpu_times.append(_cpu_seconds() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "config": config, "precision": precision, "checkpointing": checkpointing,
        "step_s": sum(times) / len(times), "step_s_min": min(times),
        "cpu_s": sum(cpu_times) / len(cpu_times),
        "peak_delta_mib": max(0, peak - rss_before) / 2**20, "peak_rss_mib": peak / 2**20,
        "saved_activations_mib": saved / 2**20, "threads": torch.get_num_threads(),
        "frames": cfg.data.num_frames, "size": cfg.model.image_size,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["demo", "small"], choices=list(CONFIGS))
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps per case (default: per config)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default: per config)")
    ap.add_argument("--out", default="bench/RESULTS_unet.md", help="markdown file to write ('-' = stdout only)")
    ap.add_argument("--rows", help="re-render the table from a previous run's stdout (JSON lines)")
    ap.add_argument("--child", nargs=3, metavar=("CONFIG", "PRECISION", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        config, precision, ckpt = args.child
        print(json.dumps(run_case(config, precision, ckpt == "1", args.warmup, args.steps)))
        return 0

    command = ".venv/bin/python -m bench.bench_unet " + shlex.join(sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()[0]
    if args.rows:  # re-render a previous run (its stdout JSON lines) without rerunning it
        rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.startswith("{")]
        for r in rows:
            r["gflop"] = model_flops(load_config(TrainConfig, ROOT / CONFIGS[r["config"]])) / 1e9
    else:
        rows = []
        for config in args.configs:
            flops = model_flops(load_config(TrainConfig, ROOT / CONFIGS[config]))
            warmup, steps = DEFAULT_STEPS[config]
            warmup = warmup if args.warmup is None else args.warmup
            steps = max(1, steps if args.steps is None else args.steps)
            for precision in ("fp32", "bf16"):
                for ckpt in (False, True):
                    cmd = [sys.executable, "-m", "bench.bench_unet", "--warmup", str(warmup),
                           "--steps", str(steps), "--child", config, precision, "1" if ckpt else "0"]
                    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                    if res.returncode != 0:
                        print(f"case {config}/{precision}/ckpt={ckpt} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                        return 1
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                    row["gflop"] = flops / 1e9
                    row["warmup"], row["steps"] = warmup, steps
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    text = render(rows, command, (load_before, os.getloadavg()[0]) if not args.rows else None)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
    return 0


def render(rows: list[dict], command: str, load: tuple[float, float] | None) -> str:
    params = {}
    for name, path in CONFIGS.items():
        with torch.device("meta"):
            params[name] = count_parameters(SpaceTimeUNet(load_config(TrainConfig, ROOT / path).model))
    lines = [
        "# SpaceTimeUNet benchmark (forward + backward, batch 1)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {rows[0]['threads'] if rows else '?'} intra-op threads. "
        "Each case runs in a fresh subprocess; warmup + timed steps per case are in the table.",
    ]
    if load is not None:
        lines.append(f"Load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f}.")
    lines += [
        "Input: the config's clip (T video frames, no extra image frames), 16 caption tokens.",
        "Peak mem = peak RSS during the timed steps minus RSS before them (activations, gradients,",
        "temporaries; weights and inputs excluded); saved act. = bytes autograd",
        "saved for backward in one forward (torch.autograd.graph.saved_tensors_hooks).",
        "GFLOP = model FLOPs of one forward+backward (torch.utils.flop_counter, recompute not counted).",
        "",
        "| config | clip | precision | checkpointing | warmup+timed | s/step (mean) | s/step (min) | "
        "CPU s/step | peak mem MiB | saved act. MiB | GFLOP/step | GFLOP/s (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['frames']}x{r['size']}x{r['size']} | {r['precision']} | "
            f"{'on' if r['checkpointing'] else 'off'} | {r['warmup']}+{r['steps']} | "
            f"{r['step_s']:.3f} | {r['step_s_min']:.3f} | {r.get('cpu_s', float('nan')):.2f} | "
            f"{r['peak_delta_mib']:.0f} | {r['saved_activations_mib']:.0f} | {r['gflop']:.1f} | "
            f"{r['gflop'] / r['step_s']:.1f} |"
        )
    lines += [
        "",
        "GPU (H100/H200, bf16, samples/s, peak memory, MFU): not measured (no GPU lent in this task).",
        "",
        "## Parameter counts",
        "",
        "| config | parameters |",
        "|---|---|",
    ]
    lines += [f"| {CONFIGS[n]} | {p:,} ({p / 1e6:.1f} M) |" for n, p in params.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
