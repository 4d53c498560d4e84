"""Step time, peak RSS and per-rank parameter/optimizer memory of each strategy, 2 processes on CPU.

    .venv/bin/python -m bench.bench_strategies --steps 8 --out bench/RESULTS_strategies.md

Each row is one `torchrun --standalone --nproc_per_node 2 tests/strategy_driver.py --size bench ...`
launch (a 1.1M-parameter SpaceTimeUNet, batch 2 x 5 frames x 16x16 per rank, fp32), with and
without gradient checkpointing. Step time is the median over the steps after the first two (warm-up),
as seen by rank 0; memory is measured per rank as the bytes of the tensors each rank holds between
steps (model parameters; AdamW moments + fp32 master copies), which is what sharding divides, plus
the process's peak RSS (which on CPU also holds the Python/torch/DeepSpeed runtime, ~0.5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ddp": ["--strategy", "ddp"],
    "fsdp": ["--strategy", "fsdp"],
    "deepspeed-z1": ["--strategy", "deepspeed", "--zero-stage", "1"],
    "deepspeed-z2": ["--strategy", "deepspeed", "--zero-stage", "2"],
    "deepspeed-z3": ["--strategy", "deepspeed", "--zero-stage", "3", "--ds-json", "configs/deepspeed/zero3.json"],
    # every parameter partitioned (no small "persistent" ones kept whole): the memory floor of ZeRO-3
    "deepspeed-z3-persist0": ["--strategy", "deepspeed", "--zero-stage", "3", "--ds-json", "PERSIST0"],
}
PERSIST0 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def run(name: str, args: list[str], steps: int, grad_ckpt: bool, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        if "PERSIST0" in args:
            (Path(tmp) / "persist0.json").write_text(json.dumps(PERSIST0))
            args = [str(Path(tmp) / "persist0.json") if a == "PERSIST0" else a for a in args]
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
               "tests/strategy_driver.py", "--size", "bench", "--frames", "5", "--bs", "2", "--steps", str(steps),
               "--precision", precision, *args, "--out", str(out)] + (["--grad-ckpt"] if grad_ckpt else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def mb(x: float) -> str:
    return f"{x / 2**20:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--only", nargs="*", default=list(CONFIGS))
    ap.add_argument("--out", default="", help="also write the markdown table here")
    args = ap.parse_args()

    rows = []
    header = ("| strategy | grad ckpt | step time s (median) | peak RSS MB r0 / r1 | params MB/rank | "
              "optimizer MB/rank | params+optim vs DDP | EMA MB/rank | setup s |")
    rows.append(header)
    rows.append("|---" * (header.count("|") - 1) + "|")
    ddp_total = None
    for name in args.only:
        for ckpt in (False, True):
            r = run(name, CONFIGS[name], args.steps, ckpt, args.precision)
            ranks = r["ranks"]
            step = statistics.median(r["step_times"][2:] or r["step_times"])
            p = max(x["param_bytes"] for x in ranks)
            o = max(x["optim_bytes"] for x in ranks)
            if name == "ddp" and not ckpt:
                ddp_total = p + o
            ratio = f"{(p + o) / ddp_total:.2f}" if ddp_total else "n/a"
            rss = " / ".join(f"{x['maxrss_mb']:.0f}" for x in ranks)
            rows.append(f"| {name} | {'yes' if ckpt else 'no'} | {step:.3f} | {rss} | {mb(p)} | {mb(o)} | {ratio} | "
                        f"{mb(max(x['local_ema_bytes'] for x in ranks))} | {r['setup_s']:.1f} |")
            print(rows[-1], flush=True)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    rows.append(f"\n(load average 1/5/15 min at the end: {load} on {os.cpu_count()} cores; precision {args.precision}, "
                f"{args.steps} steps per run)")
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
