"""What a checkpoint costs the training loop, synchronous vs `run.async_save` (issue 10 item 4).

    python -m bench.bench_async_save --config configs/demo.yaml [--set model.base_channels=64 ...]
    torchrun --standalone --nproc_per_node 2 -m bench.bench_async_save --strategy fsdp

For each mode the same strategy saves the same state (model, AdamW, EMA, RNG, loader position) into a
fresh directory, `--saves` times with `--every` training steps after each save:
- stall_s: how long the loop waits inside the save call (sync: the whole write; async: staging the
  state into CPU memory and starting the writer threads), median over the saves; first_stall_s: the
  first save's (async: it also allocates the staging memory that later saves reuse);
- step_during_s: median step time while the background write runs (the writer competes for cores
  and memory bandwidth), against step_s without any save;
- wait_s: what is still left to wait for at the next save (0 when the write finished in time);
- loop_cost_s: per save, stall + (steps during the write - the same steps without it) + wait: what a
  save adds to the wall time of training.
Random inputs of the config's clip geometry (as bench_trainer); one JSON line per mode from rank 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--strategy", default="single")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--every", type=int, default=4, help="training steps between saves")
    p.add_argument("--dir", help="where checkpoints are written (default: a temp dir; removed after)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)

    from bench.bench_trainer import synthetic_batch, train_step
    from common.config import load_config
    from model.diffusion import GaussianDiffusion
    from model.unet import SpaceTimeUNet
    from trainer import checkpoint as ckpt
    from trainer.config import TrainConfig
    from trainer.distributed import destroy_distributed, init_distributed
    from trainer.ema import EMA
    from trainer.strategies.base import build_strategy

    cfg = load_config(TrainConfig, a.config, [f"parallel.strategy={a.strategy}"] + a.overrides)
    dist_env = init_distributed(cfg.parallel.backend)
    torch.manual_seed(0)
    model = SpaceTimeUNet(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    strategy = build_strategy(cfg, dist_env)
    strategy.setup(model)
    ema = EMA(strategy.local_params(), cfg.run.ema_decay)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    dev = dist_env.device
    x, cond = synthetic_batch(cfg, cfg.data.batch_size, dev)

    def step() -> float:
        t0 = time.perf_counter()
        train_step(strategy, diffusion, x, cond)
        ema.update(strategy.local_params())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):
        step()
    plain = statistics.median(step() for _ in range(a.every * 2))
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench_async_save_"))
    root = Path(strategy.all_gather_object(str(root))[0])  # rank 0's directory for every rank
    n = 0
    for mode in ("sync", "async"):
        stalls, during, waits = [], [], []
        pending = None
        for _ in range(a.saves):
            n += 1
            t0 = time.perf_counter()
            if pending is not None:
                pending.wait(strategy)
            waits.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pending = ckpt.start_checkpoint(strategy, root / mode, n, ema=ema, loader_state={"n": n},
                                            state={}, keep_last=2, background=mode == "async")
            if mode == "sync":
                pending.wait(strategy)
            stalls.append(time.perf_counter() - t0)
            during += [step() for _ in range(a.every)]
        t0 = time.perf_counter()
        pending.wait(strategy)
        waits.append(time.perf_counter() - t0)
        extra = (statistics.mean(during) - plain) * a.every
        stall, wait = statistics.median(stalls), statistics.mean(waits[1:])
        result = {
            "mode": mode, "strategy": a.strategy, "world_size": dist_env.world_size, "params": n_params,
            "checkpoint_mb": round(sum(f.stat().st_size for f in (root / mode).rglob("*") if f.is_file())
                                   / 2**20 / min(2, a.saves), 1),
            "step_s": round(plain, 3), "first_stall_s": round(stalls[0], 3), "stall_s": round(stall, 3), "step_during_s": round(statistics.median(during), 3),
            "wait_s": round(wait, 3), "loop_cost_s": round(stall + max(0.0, extra) + wait, 3),
        }
        if dist_env.rank == 0:
            print(json.dumps(result), flush=True)
        strategy.barrier()
    if dist_env.rank == 0 and not a.dir:
        shutil.rmtree(root, ignore_errors=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    from trainer.distributed import exit_process

    exit_process(main())
