"""Measure what trainer.plan simulates: the per-rank peak of real training steps.

    torchrun --nproc_per_node 2 -m trainer.memory_probe --config configs/demo.yaml \
        --set parallel.strategy=fsdp --policy none --policy all [--batch 8] [--json OUT]

Each policy: the real model and the real strategy on real tensors and the run's process group (gloo
on CPU), two optimizer steps of `memory_sim.run_step` (the loop's step: accumulation, caption
dropout's shapes, the motion measurement, the clip, the EMA update) on a batch shaped like the
loader's. Measured on rank 0:
- `peak`: bytes of every tensor storage alive at the peak of the second step (`LiveBytes`, watching
  every storage created since before the model was built: parameters, the strategy's buffers and
  DeepSpeed's flat partitions, optimizer state, EMA, gradients, activations, communication buffers);
- `rss_growth`: the growth of the process's peak resident set over the same span (includes the
  allocator's and the CPU kernels' scratch; coarse, as RSS only grows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys

import torch

from common.config import load_config
from trainer.config import TrainConfig
from trainer.plan import variant


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(cfg: TrainConfig, dist_env, batch: int, text_len: int) -> dict:
    """Peak bytes of the second real step of `cfg` on this rank (module docstring)."""
    from model.diffusion import GaussianDiffusion
    from model.unet import SpaceTimeUNet
    from trainer.ema import EMA
    from trainer.memory_sim import LiveBytes, run_step, synthetic_batch
    from trainer.strategies.base import build_strategy

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))
    torch.manual_seed(0)
    rss0 = _max_rss()
    mem = LiveBytes()
    with mem:
        strategy = build_strategy(cfg, dist_env)
        strategy.setup(SpaceTimeUNet(cfg.model).train())
        ema = EMA(strategy.local_params(), cfg.run.ema_decay)
        diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        data = {k: (v.normal_() if k == "video" else v) if isinstance(v, torch.Tensor) else v
                for k, v in synthetic_batch(cfg, batch, text_len).items()}
        run_step(strategy, diffusion, ema, data, cfg)
        mem.reset_peak()
        run_step(strategy, diffusion, ema, data, cfg)
        mem.sync()
    out = {"peak": mem.peak, "rss_growth": _max_rss() - rss0, "world_size": dist_env.world_size,
           "strategy": cfg.parallel.strategy, "zero_stage": cfg.parallel.zero_stage,
           "policy": cfg.model.activation_checkpointing, "batch": batch}
    del strategy, ema
    return out


def main(argv: list[str] | None = None) -> int:
    from trainer.distributed import exit_process, init_distributed

    p = argparse.ArgumentParser(prog="python -m trainer.memory_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--strategy", action="append",
                   help="strategies to measure in turn (single|ddp|fsdp|zero1|zero2|zero3; default: the config's)")
    p.add_argument("--policy", action="append", help="checkpoint policies to measure (default: the config's)")
    p.add_argument("--batch", type=int, help="micro-batch (default data.batch_size)")
    p.add_argument("--json", help="write the results (rank 0) to this file")
    a = p.parse_args(argv)
    cfg = load_config(TrainConfig, a.config, a.set)
    env = init_distributed(cfg.parallel.backend)
    results = []
    for strategy in a.strategy or [None]:
        for policy in a.policy or [cfg.model.activation_checkpointing]:
            c = variant(cfg, strategy, policy)
            r = measure(c, env, a.batch or cfg.data.batch_size, cfg.data.max_text_len)
            results.append(r)
            if env.rank == 0:
                print(f"[probe] {strategy or r['strategy']} x {r['world_size']} policy {policy} micro-batch "
                      f"{r['batch']}: peak {r['peak'] / 2**20:.1f} MiB of tensors, peak RSS grew "
                      f"{r['rss_growth'] / 2**20:.1f} MiB", flush=True)
    if env.rank == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    exit_process(0)


if __name__ == "__main__":
    sys.exit(main())
