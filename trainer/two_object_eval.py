"""Does the model move each of two objects as captioned? Sample two-object prompts and read the pixels.

    python -m trainer.two_object_eval --checkpoint MODEL.safetensors [--seeds 2 --steps N --seed 0 --json OUT]

The prompts ("a red square moving left and a blue circle moving up") are the task of
`data_pipeline.two_objects`; `data_pipeline.two_object_reader` reads each colour's motion back. The
grid pairs every colour with every other (12 ordered pairs) and gives each pair two different
directions, rotating so that every colour sees every direction; sampling uses the run's `sampling:`
section with `run.sample_steps` steps, like `trainer.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from data_pipeline.synthetic import COLOURS, DIRECTIONS, SHAPES
from data_pipeline.two_object_reader import score_two_objects
from data_pipeline.two_objects import two_object_caption


def two_object_prompts(seeds: int) -> list[str]:
    """12 ordered colour pairs per seed, each with two different directions and shapes, rotating per seed."""
    colours, directions = list(COLOURS), list(DIRECTIONS)
    prompts = []
    for s in range(seeds):
        k = 0
        for i, first in enumerate(colours):
            for j, second in enumerate(colours):
                if i == j:
                    continue
                d1 = directions[(k + s) % len(directions)]
                d2 = directions[(k + s + 1 + (k // len(directions)) % 3) % len(directions)]
                objects = [(first, SHAPES[(k + s) % len(SHAPES)], d1), (second, SHAPES[(k + s + 1) % len(SHAPES)], d2)]
                prompts.append(two_object_caption(objects))
                k += 1
    return prompts


@torch.no_grad()
def evaluate_two_objects(model, diffusion, encoder, *, frames: int, size: int, seeds: int, sampling,
                         batch: int = 32, seed: int = 0, device="cpu") -> dict[str, float]:
    """Sample the prompt grid and score each object's direction; deterministic for a model and seed."""
    from trainer.generate import encode_prompts, generate
    from trainer.video_io import to_uint8_frames

    prompts = two_object_prompts(seeds)
    emb, mask = encode_prompts(encoder, prompts)
    clips = []
    for chunk, start in enumerate(range(0, len(prompts), batch)):
        sl = slice(start, start + batch)
        videos = generate(model, diffusion, emb[sl], mask[sl], frames=frames, height=size, width=size,
                          seed=seed + chunk, device=device, sampling=sampling).cpu()
        clips += [to_uint8_frames(v) for v in videos]
    return {**score_two_objects(clips, prompts), "clips": float(len(prompts))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint or exported .safetensors")
    p.add_argument("--seeds", type=int, default=2, help="copies of the 12-prompt grid")
    p.add_argument("--steps", type=int, help="sampling steps (default: run.sample_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the metrics here")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from model.diffusion import GaussianDiffusion
    from trainer.export import load_ema_model
    from trainer.generate import load_text_encoder

    model, cfg, meta = load_ema_model(a.checkpoint, a.device)
    encoder = load_text_encoder(meta.get("text_encoder") or cfg.run.text_encoder, cfg.data.max_text_len)
    sampling = cfg.sampling.with_overrides(steps=a.steps or cfg.run.sample_steps)
    metrics = evaluate_two_objects(model, GaussianDiffusion.from_config(cfg.diffusion), encoder,
                                   frames=cfg.data.num_frames, size=cfg.data.image_size, seeds=a.seeds,
                                   sampling=sampling, seed=a.seed, device=a.device)
    print(f"[two objects] each object's direction as captioned {metrics['object_direction']:.0%}, both "
          f"{metrics['both_directions']:.0%}, colour drawn {metrics['object_present']:.0%} "
          f"({metrics['clips']:.0f} clips)")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": str(a.checkpoint), "metrics": metrics}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
