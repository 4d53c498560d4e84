"""Cost of one sampling step per sampler/guidance mode with the demo SpaceTimeUNet on CPU.

    .venv/bin/python -m bench.bench_sampling                  # prints a Markdown table
    .venv/bin/python -m bench.bench_sampling --config configs/demo.yaml --batch 2 --steps 8 --repeats 3 --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_sampling --cfg-ab --batch 16 --steps 32 --repeats 5

Why: the samplers differ in network calls per step (ancestral/ddim 1, pc 2, CFG x2: two calls, or
one call on a doubled batch) and
reconstruction guidance adds a backward pass through the network; this table says what each costs
relative to a plain ancestral step (CPU time of this process, 1 thread by default), and how much of a step is the sampler's own arithmetic
(measured with a zero-cost denoiser).

--cfg-ab times whole guided sampling runs instead: classifier-free guidance in two denoiser calls per
step (uncond text None, what trainer.generate passed before) against one batched call (uncond = zero
tokens with an all-False mask, trainer.generate.null_text_branch), plus that batched branch forced
into two calls; same process, same model, runs interleaved, wall and CPU time, median of the
per-pair ratios. See cfg_ab().
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from unittest import mock

import torch

import model.sampling as sampling
from common.config import load_config
from model.diffusion import GaussianDiffusion
from model.guidance import frame_guide
from model.sampling import sample
from model.unet import SpaceTimeUNet
from trainer.config import TrainConfig
from trainer.generate import null_text_branch


def _time(fn, repeats: int) -> float:
    """Best-of CPU seconds of this process: on a shared box wall time mostly measures the neighbours."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def cfg_ab(net, diffusion, shape, cond, steps: int, repeats: int, weight: float = 1.0,
           device: torch.device | str = "cpu") -> None:
    """Interleaved A/B of CFG in two calls per step vs one batched call; prints a Markdown table.

    Three modes: "before" (two calls, uncond text None: what trainer.generate passed before), "after"
    (one call on [cond; uncond], uncond = zero tokens with an all-False mask), and the after-branch
    forced into two calls, which splits the change into its two parts (the null branch's form, the
    batching).
    """
    device = torch.device(device)
    null = null_text_branch(cond)
    before, after, split = ("two calls, uncond text None (before)", "one batched call, zero tokens + mask False (after)",
                            "two calls, zero tokens + mask False")
    modes = {before: ({"text_emb": None, "text_mask": None}, False), after: (null, False), split: (null, True)}

    def run(uncond, force_two_calls: bool) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad(), mock.patch.object(sampling, "merge_cfg_batch", wraps=sampling.merge_cfg_batch) as merge:
            if force_two_calls:
                merge.side_effect = lambda *a: None
            sample(net, diffusion, shape, steps=steps, guidance_weight=weight, cond=cond, uncond=uncond,
                   clip_x=True, generator=torch.Generator(device=device).manual_seed(0), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - w0, time.process_time() - c0

    run(*modes[after])  # warm-up: allocator growth at the 2B shapes
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    for i in range(repeats):
        order = list(modes) if i % 2 == 0 else list(reversed(modes))  # alternate who goes first
        for name in order:
            times[name].append(run(*modes[name]))
    print("| CFG mode | wall s / run (median) | CPU s / run (median) | wall s / run, each repeat |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        walls = ", ".join(f"{w:.2f}" for w, _ in ts)
        print(f"| {name} | {statistics.median(w for w, _ in ts):.2f} | {statistics.median(c for _, c in ts):.2f} "
              f"| {walls} |")
    print()
    for ref in (before, split):
        wall = [a[0] / b[0] for a, b in zip(times[ref], times[after])]
        cpu = [a[1] / b[1] for a, b in zip(times[ref], times[after])]
        print(f"({ref}) / (after), median of {repeats} interleaved pairs: wall {statistics.median(wall):.3f}x "
              f"(pairs {', '.join(f'{r:.3f}' for r in wall)}), CPU {statistics.median(cpu):.3f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared box)")
    p.add_argument("--cfg-ab", action="store_true",
                   help="only time guided sampling runs: CFG in two calls vs one batched call (interleaved A/B)")
    p.add_argument("--device", default="cpu", help="--cfg-ab only: where the model and the sampling run (cpu, cuda)")
    p.add_argument("--text-len", type=int, default=6, help="caption tokens per prompt (MiniLM: ~6-10 for the demo's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(TrainConfig, args.config)
    torch.manual_seed(0)
    net = SpaceTimeUNet(cfg.model).eval()
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    b, t, s = args.batch, cfg.data.num_frames, cfg.data.image_size
    shape = (b, cfg.model.in_channels, t, s, s)
    emb = torch.randn(b, args.text_len, cfg.model.text_dim)
    mask = torch.ones(b, args.text_len, dtype=torch.bool)
    cond = {"text_emb": emb, "text_mask": mask}
    uncond = {"text_emb": None, "text_mask": None}
    batched_uncond = null_text_branch(cond)
    context = torch.zeros(b, cfg.model.in_channels, t // 2, s, s)

    if args.cfg_ab:
        print(f"config {args.config}, video {list(shape)}, {args.steps} ancestral steps, CFG w=1, "
              f"{args.repeats} interleaved repeats, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}")
        print()
        device = torch.device(args.device)
        cond = {k: v.to(device) for k, v in cond.items()}
        cfg_ab(net.to(device), diffusion, shape, cond, args.steps, args.repeats, device=device)
        return

    cases = {
        "ancestral (1 call/step)": dict(sampler="ancestral"),
        "ddim": dict(sampler="ddim"),
        "pc (2 calls/step)": dict(sampler="pc"),
        "ancestral + CFG w=1 (2 calls/step)": dict(sampler="ancestral", guidance_weight=1.0, uncond=uncond),
        "ancestral + CFG w=1 (1 call/step on 2B)": dict(sampler="ancestral", guidance_weight=1.0,
                                                        uncond=batched_uncond),
        "ancestral + reconstruction guidance": dict(sampler="ancestral", guide=frame_guide(context, t, "reconstruction", 4.0)),
        "ancestral + replacement": dict(sampler="ancestral", guide=frame_guide(context, t, "replacement")),
        "ancestral + CFG + reconstruction guidance": dict(sampler="ancestral", guidance_weight=1.0, uncond=uncond,
                                                          guide=frame_guide(context, t, "reconstruction", 4.0)),
        "ancestral + CFG (1 call/step on 2B) + reconstruction guidance": dict(
            sampler="ancestral", guidance_weight=1.0, uncond=batched_uncond,
            guide=frame_guide(context, t, "reconstruction", 4.0)),
    }

    def run(denoiser, kw):
        with torch.no_grad():
            sample(denoiser, diffusion, shape, steps=args.steps, cond=cond, clip_x=True,
                   generator=torch.Generator().manual_seed(0), **kw)

    def zero_cost(z, logsnr, **_):
        return z

    print(f"config {args.config}, video {list(shape)}, {args.steps} steps, best of {args.repeats}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print()
    print("| mode | CPU ms / step (U-Net) | x plain ancestral | CPU ms / step (zero-cost denoiser) |")
    print("|---|---|---|---|")
    run(net, {})  # warm-up: first calls pay for allocator growth and lazy init
    base = None
    for name, kw in cases.items():
        sec = _time(lambda kw=kw: run(net, kw), args.repeats) / args.steps
        overhead = _time(lambda kw=kw: run(zero_cost, kw), args.repeats) / args.steps
        base = base or sec
        print(f"| {name} | {sec * 1e3:.1f} | {sec / base:.2f} | {overhead * 1e3:.2f} |")


if __name__ == "__main__":
    main()
