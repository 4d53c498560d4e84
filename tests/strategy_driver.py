"""Drives one Strategy through the loop's call sequence on a tiny SpaceTimeUNet (run under torchrun).

Used by tests/test_strategies_dist.py and bench/bench_strategies.py. Data, diffusion time and noise
come from generators seeded by (step, rank), so a resumed run sees exactly what the uninterrupted run
saw without depending on RNG restore; what is left to get right is the strategy's own state.

    torchrun --standalone --nproc_per_node 2 tests/strategy_driver.py --strategy fsdp --steps 4 --out r.json

Writes a JSON report (rank 0) with per-step losses and grad norms, and optionally torch.save files of
the full initial / final / EMA state and of every step's full weights (for the EMA hand check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import UNetConfig  # noqa: E402
from model.diffusion import GaussianDiffusion  # noqa: E402
from model.unet import SpaceTimeUNet  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.distributed import destroy_distributed, init_distributed  # noqa: E402
from trainer.ema import EMA  # noqa: E402
from trainer.strategies.base import build_strategy  # noqa: E402


def tiny_unet(size: str) -> UNetConfig:
    if size == "bench":
        return UNetConfig(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, image_size=16,
                          attention_resolutions=(8, 4), head_dim=16, cond_dim=128, text_dim=32, groups=8)
    return UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, image_size=8,
                      attention_resolutions=(4,), head_dim=8, cond_dim=16, text_dim=16, groups=4)


def batch(step: int, micro: int, rank: int, cfg: UNetConfig, frames: int, bs: int):
    g = torch.Generator().manual_seed(1_000 * step + 10 * micro + rank)
    s = cfg.image_size
    x = torch.rand(bs, cfg.in_channels, frames, s, s, generator=g) * 2 - 1
    emb = torch.randn(bs, 5, cfg.text_dim, generator=g)
    mask = torch.ones(bs, 5, dtype=torch.bool)
    mask[0] = False  # one dropped caption per batch: the null embedding path
    t = torch.rand(bs, generator=g)
    noise = torch.randn(x.shape, generator=g)
    return x, dict(text_emb=emb, text_mask=mask, num_video_frames=frames - 1), t, noise


def local_nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_nbytes(strategy) -> int:
    """Bytes of the optimizer state tensors (AdamW moments + fp32 master copies) held by this rank."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, DTensor):
            t = t.to_local()
        key = (t.data_ptr(), t.numel()) if torch.is_tensor(t) else None
        if key is not None and t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    opt = strategy.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizer wraps a torch AdamW
    for st in inner.state.values():
        for v in st.values():
            add(v)
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO fp32 master
        for t in getattr(opt, attr, None) or []:
            add(t)
    return total


def consumed_grad_norm(strategy) -> float:
    """Global norm of the gradient AdamW consumed in its first step, read back from its first moment:
    after one step from zero state exp_avg = (1 - beta1) * g, whatever unscaling, clipping and sharding
    happened before (DeepSpeed clips inside engine.step(), so its gradients are not visible otherwise).
    Collective when the world size is above 1."""
    from torch.distributed.tensor import DTensor

    opt = strategy.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizer wraps a torch AdamW
    sq = torch.zeros((), dtype=torch.float64, device=strategy.device)  # NCCL reduces device tensors
    # ZeRO-3 swaps its flat fp32 partitions in and out of param_groups around each step: walk the state
    betas = {group["betas"][0] for group in inner.param_groups}
    assert len(betas) == 1, betas
    beta1 = betas.pop()
    for st in inner.state.values():
        m = st.get("exp_avg")
        if m is None:
            continue
        if isinstance(m, DTensor):
            m = m.to_local()  # FSDP2: disjoint dim-0 shards; ZeRO: disjoint flat partitions
        sq += (m.detach().to(sq.device, torch.float64) / (1.0 - beta1)).pow(2).sum()
    if strategy.dist.world_size > 1:
        torch.distributed.all_reduce(sq)
    return float(sq.sqrt())


def param_nbytes(strategy) -> int:
    """Bytes of model parameters resident on this rank between steps (shards under FSDP2/ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in strategy.unwrapped_model().parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel() * p.ds_tensor.element_size() + p.numel() * p.element_size()
        elif isinstance(p, DTensor):
            total += local_nbytes([p.to_local()])
        else:
            total += local_nbytes([p])
    return total


def probe_loss(strategy, diffusion, cfg: TrainConfig, args, rank: int) -> float:
    """Mean loss over every step's training batch (step's own t and noise), no gradient: the same
    number before and after training measures whether the run fit its data. Collective."""
    total = 0.0
    with torch.no_grad():
        for step in range(args.steps):
            x, cond, t, noise = batch(step, 0, rank, cfg.model, args.frames, args.bs)
            with strategy.autocast():
                per_sample, _ = diffusion.loss_terms(strategy.forward, x, t=t, noise=noise, **cond)
            total += float(per_sample.mean())
    return strategy.all_reduce_mean(total / args.steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="fsdp")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--save-at", type=int, default=-1, help="save a checkpoint after this many steps")
    ap.add_argument("--stop-after-save", action="store_true")
    ap.add_argument("--resume", default="", help="checkpoint dir to load (EMA from ema-rank{r}.pt)")
    ap.add_argument("--ckpt", default="", help="checkpoint dir to write at --save-at")
    ap.add_argument("--nan-step", type=int, default=-1, help="feed a NaN batch at this step")
    ap.add_argument("--zero-lr-step", type=int, default=-1, help="set lr=0 at this step (set_lr must reach "
                    "the optimizer: the weights may not move)")
    ap.add_argument("--dump", default="", help="directory for torch.save dumps of full states")
    ap.add_argument("--dump-steps", action="store_true", help="also dump full weights after every step")
    ap.add_argument("--ds-json", default="")
    ap.add_argument("--ema-decay", type=float, default=0.9)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--probe", action="store_true", help="report probe_loss (all training batches, no "
                    "gradient) before the first step and after the last")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cfg = TrainConfig()
    cfg.model = tiny_unet(args.size)
    cfg.model.gradient_checkpointing = args.grad_ckpt
    cfg.parallel.strategy = args.strategy
    cfg.parallel.zero_stage = args.zero_stage
    cfg.parallel.deepspeed_config = args.ds_json
    cfg.run.precision = args.precision
    cfg.data.batch_size = args.bs
    cfg.optim.grad_accum = args.accum
    cfg.optim.lr = 1e-3
    cfg.optim.grad_clip = args.grad_clip

    t0 = time.perf_counter()
    env = init_distributed()
    torch.manual_seed(0)
    model = SpaceTimeUNet(cfg.model)
    strategy = build_strategy(cfg, env)
    strategy.setup(model)
    ema = EMA(strategy.local_params(), args.ema_decay)
    setup_s = time.perf_counter() - t0
    diffusion = GaussianDiffusion(prediction="v", loss_weighting="v_mse")
    rank = env.rank
    dump = Path(args.dump) if args.dump else None
    if dump is not None and rank == 0:
        dump.mkdir(parents=True, exist_ok=True)

    def dump_full(name, tensors=None):
        full = strategy.gather_full_state(tensors)
        if dump is not None and rank == 0:
            torch.save(full, dump / name)

    start = 0
    if args.resume:
        strategy.load(Path(args.resume))
        ema.load_state_dict(torch.load(Path(args.resume) / f"ema-rank{rank}.pt", weights_only=True))
        start = int(json.loads((Path(args.resume) / "driver.json").read_text())["step"])
    elif dump is not None:
        dump_full("init.pt")

    losses, norms, times, skipped = [], [], [], []
    first_consumed_norm = None
    probe_before = probe_loss(strategy, diffusion, cfg, args, rank) if args.probe else None
    for step in range(start, args.steps):
        ts = time.perf_counter()
        strategy.set_lr(0.0 if step == args.zero_lr_step else cfg.optim.lr)
        total = 0.0
        for micro in range(args.accum):
            x, cond, t, noise = batch(step, micro, rank, cfg.model, args.frames, args.bs)
            if step == args.nan_step:
                x = torch.full_like(x, float("nan"))
            with strategy.no_sync() if micro < args.accum - 1 else torch.enable_grad():
                with strategy.autocast():
                    per_sample, _ = diffusion.loss_terms(strategy.forward, x, t=t, noise=noise, **cond)
                loss = per_sample.mean()
                strategy.backward(loss / args.accum)
            total += float(loss.detach())
        norm = strategy.clip_grad_norm(cfg.optim.grad_clip)
        mean_loss = strategy.all_reduce_mean(total / args.accum)
        if math.isfinite(norm) and math.isfinite(mean_loss):
            strategy.optimizer_step()
            ema.update(strategy.local_params())
        else:
            strategy.skip_step()
            skipped.append(step)
        strategy.zero_grad()
        times.append(time.perf_counter() - ts)
        if step == 0 and not skipped:  # outside the timed step (bench_strategies reads step_times)
            first_consumed_norm = consumed_grad_norm(strategy)
        losses.append(mean_loss)
        norms.append(norm)
        if args.dump_steps:
            dump_full(f"step{step}.pt")
        if step + 1 == args.save_at and args.ckpt:
            ck = Path(args.ckpt)
            if rank == 0:
                ck.mkdir(parents=True, exist_ok=True)
            strategy.barrier()
            strategy.save(ck)
            torch.save(ema.state_dict(), ck / f"ema-rank{rank}.pt")
            if rank == 0:
                (ck / "driver.json").write_text(json.dumps({"step": step + 1}))
            strategy.barrier()
            if args.stop_after_save:
                break

    probe_after = probe_loss(strategy, diffusion, cfg, args, rank) if args.probe else None
    if dump is not None:
        dump_full("final.pt")
        dump_full("ema.pt", ema.shadow)
    report = {
        "rank": rank, "world": env.world_size, "losses": losses, "grad_norms": norms, "skipped": skipped,
        "step_times": times, "setup_s": setup_s, "grad_clip": cfg.optim.grad_clip,
        "first_consumed_grad_norm": first_consumed_norm, "probe_loss": [probe_before, probe_after],
        "local_param_numel": sum(p.numel() for p in strategy.local_params()),
        "local_ema_bytes": local_nbytes(ema.shadow),
        "param_bytes": param_nbytes(strategy),
        "optim_bytes": optimizer_state_nbytes(strategy),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "full_numel": sum(p.numel() for p in model.parameters()) if args.strategy != "deepspeed"
        or args.zero_stage != 3 else sum(p.ds_numel for p in model.parameters()),
    }
    per_rank = [None] * env.world_size
    if env.world_size > 1:
        torch.distributed.all_gather_object(per_rank, report)
    else:
        per_rank = [report]
    if rank == 0:
        Path(args.out).write_text(json.dumps({"ranks": per_rank, **report}, indent=1))
    strategy.barrier()
    destroy_distributed()
    os._exit(0)  # DeepSpeed leaves non-daemon threads behind on some versions


if __name__ == "__main__":
    main()
