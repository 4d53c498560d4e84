"""Cost of one sampling step per sampler/guidance mode with the demo SpaceTimeUNet on CPU.

    .venv/bin/python -m bench.bench_sampling                  # prints a Markdown table
    .venv/bin/python -m bench.bench_sampling --config configs/demo.yaml --batch 2 --steps 8 --repeats 3 --threads 1

Why: the samplers differ in network calls per step (ancestral/ddim 1, pc 2, CFG x2) and
reconstruction guidance adds a backward pass through the network; this table says what each costs
relative to a plain ancestral step (CPU time of this process, 1 thread by default), and how much of a step is the sampler's own arithmetic
(measured with a zero-cost denoiser).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from model.diffusion import GaussianDiffusion
from model.guidance import frame_guide
from model.sampling import sample
from model.unet import SpaceTimeUNet
from trainer.config import TrainConfig, load_config


def _time(fn, repeats: int) -> float:
    """Best-of CPU seconds of this process: on a shared box wall time mostly measures the neighbours."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared box)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(TrainConfig, args.config)
    torch.manual_seed(0)
    net = SpaceTimeUNet(cfg.model).eval()
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    b, t, s = args.batch, cfg.data.num_frames, cfg.data.image_size
    shape = (b, cfg.model.in_channels, t, s, s)
    emb = torch.randn(b, 6, cfg.model.text_dim)
    mask = torch.ones(b, 6, dtype=torch.bool)
    cond = {"text_emb": emb, "text_mask": mask}
    uncond = {"text_emb": None, "text_mask": None}
    context = torch.zeros(b, cfg.model.in_channels, t // 2, s, s)

    cases = {
        "ancestral (1 call/step)": dict(sampler="ancestral"),
        "ddim": dict(sampler="ddim"),
        "pc (2 calls/step)": dict(sampler="pc"),
        "ancestral + CFG w=1 (2 calls/step)": dict(sampler="ancestral", guidance_weight=1.0, uncond=uncond),
        "ancestral + reconstruction guidance": dict(sampler="ancestral", guide=frame_guide(context, t, "reconstruction", 4.0)),
        "ancestral + replacement": dict(sampler="ancestral", guide=frame_guide(context, t, "replacement")),
        "ancestral + CFG + reconstruction guidance": dict(sampler="ancestral", guidance_weight=1.0, uncond=uncond,
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
