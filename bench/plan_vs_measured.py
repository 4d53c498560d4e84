"""Planned vs measured for bench/gpu_check.sh: per case, trainer.plan's per-rank peak and step time
next to what bench.bench_trainer measured on the GPU.

    python -m bench.plan_vs_measured --config CFG --batch B LOG...     (LOG: strategy-policy-compile.log)

The planner runs for one GPU (the check's world size) with the peak of the GPU at hand; measured peak
memory is torch.cuda.max_memory_allocated (tensors, as the plan's peak before its reserve).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.config import load_config
from trainer.config import TrainConfig
from trainer.plan import GiB, PlanInputs, Planner


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("logs", nargs="+")
    a = p.parse_args()
    cfg = load_config(TrainConfig, a.config, [f"data.batch_size={a.batch}", "run.precision=bf16"])
    planner = Planner(cfg, PlanInputs(gpus=1, peak_tflops=a.peak_tflops, mfu=a.mfu), log=lambda s: None)
    print("| strategy | policy | planned peak GiB | measured peak GiB | planned step s (MFU) | measured step s (MFU) |")
    print("|---|---|---|---|---|---|")
    for log in a.logs:
        strategy, policy, comp = Path(log).stem.rsplit("-", 2)
        rows = [json.loads(line) for line in open(log) if line.startswith("{")]
        if not rows or comp == "1":
            continue
        r = rows[-1]
        name = {"single": "ddp", "deepspeed": "zero2"}.get(strategy, strategy)
        row = planner.row(name, policy)
        mfu = f"{r['mfu']:.2f}" if "mfu" in r else "-"
        print(f"| {strategy} | {policy} | {row.memory.peak / GiB:.2f} | {r['peak_mem_gb_max_rank']:.2f} "
              f"| {row.step_seconds:.3f} ({row.mfu:.2f}) | {r['step_time_s']:.3f} ({mfu}) |", flush=True)


if __name__ == "__main__":
    main()
