"""The README's "Plan your run" table: trainer.plan for the paper configs at several GPU counts.

    .venv/bin/python -m bench.plan_table [--gpus 8 64 512] [--mfu 0.4] > table.md

For each config and GPU count: the recommended setting and the config's own, with per-rank memory,
the largest micro-batch, step time and the epoch (10M clips). Single-process simulations are shared
between GPU counts (they do not depend on it); FSDP is simulated at each count.
"""

from __future__ import annotations

import argparse
import time

from common.config import load_config
from trainer.config import TrainConfig
from trainer.plan import GiB, PlanInputs, Planner, _config_strategy, recommend

CONFIGS = ("configs/vdm_t2v_small_16x64.yaml", "configs/vdm_t2v_large_16x64.yaml")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--config", nargs="+", default=list(CONFIGS))
    a = p.parse_args()
    print("| config | GPUs | setting | per-rank GiB (params+grads+optim+EMA / activations / comm+reserve) | fits "
          "| max micro-batch | step s | epoch h | GPU-h/epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in a.config:
        cfg = load_config(TrainConfig, path)
        shared: dict = {}
        for gpus in a.gpus:
            t0 = time.perf_counter()
            planner = Planner(cfg, PlanInputs(gpus=gpus, mfu=a.mfu), log=lambda s: None)
            planner._sims = shared | {k: v for k, v in planner._sims.items()}
            rows = [planner.row(s, pol) for s in ("ddp", "fsdp", "zero2", "zero3")
                    for pol in ("none", "selective", "all")]
            own = planner.row(_config_strategy(cfg), cfg.model.activation_checkpointing)
            shared.update({k: v for k, v in planner._sims.items() if k[0] == "single"})
            best, why = recommend(rows, cfg)
            for label, r in (("recommended", best), ("config's", own)):
                if r is None:
                    print(f"| {path} | {gpus} | {label}: none fits ({why}) | | | | | | |")
                    continue
                m = r.memory
                states = m.parameters + m.gradients + m.optimizer + m.ema
                print(f"| {path.split('/')[-1]} | {gpus} | {label}: {r.strategy}, {r.policy} | {states / GiB:.1f} / "
                      f"{m.activations / GiB:.1f} / {(m.comm + r.reserve) / GiB:.1f} = {r.total / GiB:.1f} "
                      f"| {'yes' if r.fits else 'NO'} | {r.max_micro_batch} | {r.step_seconds:.3g} "
                      f"| {r.epoch_hours:.3g} | {r.gpu_hours_per_epoch:.4g} |", flush=True)
            print(f"<!-- {path} {gpus} GPUs planned in {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
