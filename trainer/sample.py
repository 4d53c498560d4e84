"""Generate videos from a trained model (EMA weights) and write mp4 + gif.

    python -m trainer.sample --checkpoint model.safetensors|RUN_DIR|CKPT_DIR --prompt "a red square moving right" \
        --out red.mp4 [--sampler ancestral|ddim|pc --steps 256 --guidance-weight 2 --seed 0 --frames 16
        --extend-to 32 --reconstruction-weight 4 --text-encoder minilm]

Several --prompt values give OUT_0.mp4, OUT_1.mp4, ... Defaults come from the training config's
`sampling:` section. --extend-to N > frames makes longer videos window by window with reconstruction
guidance on the frames generated so far (paper section 3.1).

Conditional generation from a real video (trainer/conditional.py; the prompt is then optional):

    python -m trainer.sample --checkpoint M --condition in.mp4 --out O.mp4 --task predict [--observed-frames K
        --extend-to N]                      # the first K frames observed, the rest of the window (or N) generated
    ... --task interpolate [--factor F]     # every frame observed, F-1 generated between; output at F x fps
    ... --task upsample [--factor S]        # the video observed at 1/S of the model's size, generated at full size

The video is decoded, resized and center-cropped as the data pipeline prepares clips, at
--condition-fps (default: the data pipeline's clip.fps), up to --condition-frames frames.
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
    p.add_argument("--prompt", action="append", help="caption (repeatable; optional with --condition)")
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
    p.add_argument("--condition", help="a video to condition on (with --task)")
    p.add_argument("--task", choices=["predict", "interpolate", "upsample"], help="what to do with --condition")
    p.add_argument("--observed-frames", type=int, help="predict: frames observed (default: half a window)")
    p.add_argument("--factor", type=int, default=2, help="interpolate: frame-rate factor; upsample: spatial factor")
    p.add_argument("--condition-fps", type=float, help="frame rate the video is read at (default: clip.fps)")
    p.add_argument("--condition-frames", type=int,
                   help="frames read from the video (default: predict K, interpolate one window's, upsample one window)")
    p.add_argument("--guidance", choices=["reconstruction", "replacement"], default="reconstruction",
                   help="conditioning method (replacement: the baseline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if (a.condition is None) != (a.task is None):
        p.error("--condition and --task go together")
    if a.condition is None and not a.prompt:
        p.error("--prompt is required without --condition")
    if a.prompt and a.condition and len(a.prompt) > 1:
        p.error("--condition takes at most one --prompt")
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
    from trainer.generate import generate
    from trainer.video_io import OUTPUT_FPS, to_uint8_frames, write_gif, write_mp4

    try:
        model, cfg, meta = load_ema_model(a.checkpoint, a.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"sample: {e}", file=sys.stderr)
        return 1
    if a.condition is None or a.prompt:
        try:
            emb, mask = _prompt_embeddings(a, cfg, meta)
        except ValueError as e:
            print(f"sample: {e}", file=sys.stderr)
            return 1
    else:
        emb = mask = None
    frames = a.frames or cfg.data.num_frames
    sampling = sampling_from_args(cfg.sampling, a)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    if a.condition is not None:
        try:
            videos, fps = _conditional(a, model, diffusion, cfg, sampling, emb, mask, frames)
        except ValueError as e:
            print(f"sample: {e}", file=sys.stderr)
            return 1
        fps = fps if a.fps is None else a.fps
    else:
        videos = generate(model, diffusion, emb, mask, frames=frames, height=cfg.data.image_size,
                          width=cfg.data.image_size, channels=cfg.model.in_channels, sampling=sampling, seed=a.seed,
                          extend_to=a.extend_to, device=a.device)
        fps = OUTPUT_FPS if a.fps is None else a.fps
    for video, path in zip(videos, output_paths(a.out, len(videos))):
        frames_u8 = to_uint8_frames(video)
        write_mp4(path, frames_u8, fps)
        gif = write_gif(path.with_suffix(".gif"), frames_u8, fps)
        print(f"wrote {path} and {gif} ({frames_u8.shape[0]} frames at {fps:g} fps)")
    return 0


def _prompt_embeddings(a: argparse.Namespace, cfg, meta: dict):
    from trainer.generate import encode_prompts, load_text_encoder

    encoder_name = a.text_encoder or meta.get("text_encoder") or cfg.run.text_encoder
    if not encoder_name:
        raise ValueError("the checkpoint names no text encoder; pass --text-encoder")
    encoder = load_text_encoder(encoder_name, cfg.data.max_text_len)
    if encoder.dim != cfg.model.text_dim:
        raise ValueError(f"text encoder {encoder_name!r} gives {encoder.dim}-d embeddings, the model expects "
                         f"{cfg.model.text_dim}")
    return encode_prompts(encoder, a.prompt)


def _conditional(a: argparse.Namespace, model, diffusion, cfg, sampling, emb, mask, frames: int):
    """(videos, output fps) for --condition: the video read as the data pipeline reads clips, completed."""
    from data_pipeline.config import ClipConfig
    from trainer.conditional import Task, complete, load_condition_video

    task = Task(a.task, window=frames, size=cfg.data.image_size, factor=a.factor,
                observed_frames=a.observed_frames or 0)
    n = a.condition_frames or {"predict": task.observed_frames, "interpolate": len(task.operator().indices),
                               "upsample": frames}[task.name]
    fps = a.condition_fps or ClipConfig.fps
    observed = load_condition_video(a.condition, task, frames=n, fps=fps)
    print(f"{a.condition}: {observed.shape[2]} frames of {task.observed_size}x{task.observed_size} at {fps:g} fps "
          f"observed ({task.name})")
    if task.name == "predict" and observed.shape[2] >= frames:
        raise ValueError(f"predict observes fewer frames than a window ({frames}); got {observed.shape[2]}")
    videos = complete(model, diffusion, task, observed, sampling=sampling, text_emb=emb, text_mask=mask, seed=a.seed,
                      total_frames=a.extend_to if task.name == "predict" else None, guidance=a.guidance,
                      device=a.device)
    return videos, task.output_fps(fps)


if __name__ == "__main__":
    sys.exit(main())
