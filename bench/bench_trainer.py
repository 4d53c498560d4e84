"""Training-step benchmark for any strategy: step time, throughput, peak memory, and the parameter +
optimizer bytes each rank holds (which sharded strategies should divide by the world size).

    python -m bench.bench_trainer --config configs/demo.yaml --strategy single [--steps 10 --batch 4 --gc]
    torchrun --standalone --nproc_per_node 2 -m bench.bench_trainer --config configs/demo.yaml --strategy ddp

Inputs are random tensors of the config's clip geometry (T+K frames, text of 16 tokens), so the
number is the model + strategy cost without data loading (bench/bench_loader.py measures that).
Prints one JSON line (rank 0) with per-rank maxima; GPU runs also report MFU against --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def optimizer_bytes(opt) -> int:
    if opt is None:
        return 0
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


CAPTION_TOKENS = 16  # of the synthetic captions (synthetic_batch and the FLOP count agree)


def synthetic_batch(cfg, batch: int, device) -> tuple:
    """(x, cond): a random clip batch of the config's geometry and CAPTION_TOKENS random caption tokens."""
    frames, size = cfg.data.num_frames + cfg.data.num_image_frames, cfg.data.image_size
    x = torch.rand(batch, cfg.model.in_channels, frames, size, size, device=device) * 2 - 1
    cond = {"text_emb": torch.randn(batch, CAPTION_TOKENS, cfg.model.text_dim, device=device),
            "text_mask": torch.ones(batch, CAPTION_TOKENS, dtype=torch.bool, device=device),
            "num_video_frames": cfg.data.num_frames}
    return x, cond


def train_step(strategy, diffusion, x, cond: dict) -> None:
    """Forward + loss + backward + clip + AdamW, as the trainer's step (without the data)."""
    with strategy.autocast():
        per_sample, _ = diffusion.loss_terms(strategy.forward, x, **cond)
    strategy.backward(per_sample.mean())
    strategy.clip_grad_norm(1.0)
    strategy.optimizer_step()
    strategy.zero_grad()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--strategy", default="single")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, help="per-rank batch (default: data.batch_size)")
    p.add_argument("--precision", help="fp32|bf16|fp16 (default: run.precision)")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing on (= --policy all)")
    p.add_argument("--policy", help="model.checkpoint_policy (none|all|attention|resblocks|every_k|selective)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (run.compile)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="dense peak TFLOP/s for MFU (default: trainer.perf's device table on GPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)

    from common.config import load_config
    from model.diffusion import GaussianDiffusion
    from model.unet import SpaceTimeUNet
    from trainer.config import TrainConfig
    from trainer.distributed import destroy_distributed, init_distributed
    from trainer.metrics import peak_memory_gb
    from trainer.strategies.base import build_strategy

    policy = a.policy or ("all" if a.gc else "none")
    sets = [f"parallel.strategy={a.strategy}", f"model.checkpoint_policy={policy}",
            "model.gradient_checkpointing=false"] + a.overrides
    if a.precision:
        sets.append(f"run.precision={a.precision}")
    cfg = load_config(TrainConfig, a.config, sets)
    dist_env = init_distributed(cfg.parallel.backend)
    torch.manual_seed(0)
    model = SpaceTimeUNet(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    compiled = None
    if a.compile:
        from trainer.compile import compile_blocks

        compiled = compile_blocks(model, cfg.run.compile_backend, cfg.run.compile_mode or None)
    strategy = build_strategy(cfg, dist_env)
    strategy.setup(model)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    dev = dist_env.device
    b = a.batch or cfg.data.batch_size
    frames = cfg.data.num_frames + cfg.data.num_image_frames
    size = cfg.data.image_size
    x, cond = synthetic_batch(cfg, b, dev)

    times = []
    t_first = None
    for i in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(strategy, diffusion, x, cond)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            t_first = time.perf_counter() - t0
            if compiled is not None:
                compiled.mark_warm(t_first)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)

    step = statistics.median(times)
    world = dist_env.world_size
    result = {
        "strategy": a.strategy, "world_size": world, "device": str(dev), "precision": cfg.run.precision,
        "checkpoint_policy": policy, "compile": a.compile, "first_step_s": round(t_first, 2), "config": a.config, "params": n_params, "batch_per_rank": b,
        "frames": frames, "size": size, "step_time_s": round(step, 4),
        "videos_per_s": round(b * world / step, 3),
        "peak_mem_gb_max_rank": round(strategy.all_reduce_max(peak_memory_gb(dev)), 3),
        "param_mb_per_rank": round(strategy.all_reduce_max(tensor_bytes(strategy.local_params()) / 2**20), 2),
        "optimizer_mb_per_rank": round(strategy.all_reduce_max(optimizer_bytes(strategy.optimizer) / 2**20), 2),
    }
    # model FLOPs of forward + backward on the meta device (trainer.perf, as the trainer logs them)
    from trainer.perf import BatchGeometry, StepFlops, peak_tflops

    geometry = BatchGeometry(b, frames, cfg.data.num_frames, size, size, CAPTION_TOKENS)
    flops = StepFlops.count(cfg.model, geometry)
    result["model_tflops_per_s"] = round(flops.model / step / 1e12, 3)
    result["hardware_tflops_per_s"] = round(flops.hardware / step / 1e12, 3)
    result["samples_per_s"] = round(b * world * (1 + cfg.data.num_image_frames) / step, 3)
    peak, _ = peak_tflops(dev, cfg.run.precision, a.peak_tflops)
    if peak:
        result["mfu"] = round(flops.model / step / 1e12 / peak, 4)
    if compiled is not None:
        result["recompiles"] = compiled.new_graphs()
    if dist_env.rank == 0:
        print(json.dumps(result), flush=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    from trainer.distributed import exit_process

    exit_process(main())
