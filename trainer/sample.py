"""Generate videos from a trained model (EMA weights) and write mp4 + gif.

    python -m trainer.sample --checkpoint model.safetensors|RUN_DIR|CKPT_DIR --prompt "a red square moving right" \
        --out red.mp4 [--sampler ancestral|ddim|pc --steps 256 --guidance-weight 2 --seed 0 --frames 16
        --extend-to 32 --reconstruction-weight 4 --text-encoder minilm]

Several --prompt values give OUT_0.mp4, OUT_1.mp4, ... Defaults come from the training config's
`sampling:` section. --extend-to N > frames makes longer videos window by window with reconstruction
guidance on the frames generated so far (paper section 3.1).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from model.config import SAMPLERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported .safetensors, a run dir or a checkpoint dir")
    p.add_argument("--prompt", action="append", required=True, help="caption (repeatable)")
    p.add_argument("--out", required=True, help="output .mp4 path (a .gif is written next to it)")
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-weight", type=float)
    p.add_argument("--gamma", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, help="frames per window (default: the training clip length)")
    p.add_argument("--extend-to", type=int, help="total frames; > frames extends autoregressively")
    p.add_argument("--reconstruction-weight", type=float,
                   help="reconstruction guidance weight (extension; default: sampling.reconstruction_weight)")
    p.add_argument("--guide-weight", type=float, help=argparse.SUPPRESS)  # old name of --reconstruction-weight
    p.add_argument("--text-encoder", help="encoder name/path (default: the one the model was trained with)")
    p.add_argument("--fps", type=float, help="frame rate of the written files (default: trainer.video_io.OUTPUT_FPS)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.guide_weight is not None:
        from common.config import warn_renamed
        from model.config import SamplingConfig

        warn_renamed("--guide-weight", "--reconstruction-weight", SamplingConfig.RENAMED_WHY, stacklevel=2)
        if a.reconstruction_weight is not None:
            p.error("--guide-weight is the old name of --reconstruction-weight: give only --reconstruction-weight")
        a.reconstruction_weight = a.guide_weight
    return a


def sampling_from_args(sampling, a: argparse.Namespace):
    """The checkpoint's `sampling:` section with the flags given; an unset flag (or --steps 0) keeps
    the section's value, so the config is the one source of every default."""
    return sampling.with_overrides(sampler=a.sampler, steps=a.steps or None, gamma=a.gamma,
                                   guidance_weight=a.guidance_weight, reconstruction_weight=a.reconstruction_weight)


def output_paths(out: str | Path, n: int) -> list[Path]:
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        out = out.with_suffix(".mp4")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}.mp4") for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from model.diffusion import GaussianDiffusion
    from trainer.export import load_ema_model
    from trainer.generate import encode_prompts, generate, load_text_encoder
    from trainer.video_io import OUTPUT_FPS, to_uint8_frames, write_gif, write_mp4

    try:
        model, cfg, meta = load_ema_model(a.checkpoint, a.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"sample: {e}", file=sys.stderr)
        return 1
    encoder_name = a.text_encoder or meta.get("text_encoder") or cfg.run.text_encoder
    if not encoder_name:
        print("sample: the checkpoint names no text encoder; pass --text-encoder", file=sys.stderr)
        return 1
    encoder = load_text_encoder(encoder_name, cfg.data.max_text_len)
    if encoder.dim != cfg.model.text_dim:
        print(f"sample: text encoder {encoder_name!r} gives {encoder.dim}-d embeddings, the model expects "
              f"{cfg.model.text_dim}", file=sys.stderr)
        return 1
    emb, mask = encode_prompts(encoder, a.prompt)
    frames = a.frames or cfg.data.num_frames
    sampling = sampling_from_args(cfg.sampling, a)
    videos = generate(model, GaussianDiffusion.from_config(cfg.diffusion), emb, mask, frames=frames,
                      height=cfg.data.image_size, width=cfg.data.image_size, channels=cfg.model.in_channels,
                      sampling=sampling, seed=a.seed, extend_to=a.extend_to, device=a.device)
    fps = OUTPUT_FPS if a.fps is None else a.fps
    for video, path in zip(videos, output_paths(a.out, len(a.prompt))):
        frames_u8 = to_uint8_frames(video)
        write_mp4(path, frames_u8, fps)
        gif = write_gif(path.with_suffix(".gif"), frames_u8, fps)
        print(f"wrote {path} and {gif} ({frames_u8.shape[0]} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
