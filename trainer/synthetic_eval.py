"""Does the model draw what the caption says? Sample a grid of synthetic prompts and read the pixels.

The synthetic renderer knows the truth of "a {colour} {shape} moving {direction}", so the score
needs no learned classifier: every colour x direction prompt (shapes taken in turn) is sampled
with several seeds and `data_pipeline.synthetic_reader` reads colour, shape and direction back.
`extension` also samples 2x the clip length window by window (reconstruction guidance) and asks
whether the frames after the window boundary still move as captioned. `caption_word_effect` asks,
without sampling, whether the prediction depends on the direction word at all.

`evaluate_motion_kinds` does the same for every motion kind of `make_motion_kind_videos` (directions,
growing, shrinking, turning either way: eval.motion_kinds).

Used by `trainer.evaluate` and by the training loop's `run.eval_every`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from data_pipeline.synthetic import COLOURS, DIRECTIONS, MOTION_KINDS, SHAPES, TURNING_SHAPES, motion_caption
from data_pipeline.synthetic_reader import Reading, parse_caption, read_clip, score
from model.config import SamplingConfig


def prompt_grid(seeds: int) -> tuple[list[str], list[int]]:
    """Every colour x direction prompt once per seed; the shape rotates so each cell sees all shapes.

    Returns (prompts, seed index of each prompt).
    """
    prompts, seed_of = [], []
    for s in range(seeds):
        for i, colour in enumerate(COLOURS):
            for j, direction in enumerate(DIRECTIONS):
                shape = SHAPES[(i + j + s) % len(SHAPES)]
                prompts.append(f"a {colour} {shape} moving {direction}")
                seed_of.append(s)
    return prompts, seed_of


@dataclass
class SyntheticReport:
    metrics: dict[str, float]
    prompts: list[str]
    readings: list[Reading]
    seconds: float
    clips: int
    extension: dict[str, float] = field(default_factory=dict)
    word_effect: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """Accuracy of colour and direction per colour x direction cell (the demo prints it)."""
        cells: dict[tuple[str, str], list[bool]] = {}
        for prompt, reading in zip(self.prompts, self.readings):
            t = parse_caption(prompt)
            ok = reading.colour == t["colour"] and reading.direction == t["direction"]
            cells.setdefault((t["colour"], t["direction"]), []).append(ok)
        dirs = list(DIRECTIONS)
        lines = ["colour \\ direction " + " ".join(f"{d:>6}" for d in dirs)]
        for colour in COLOURS:
            row = [cells.get((colour, d), []) for d in dirs]
            lines.append(f"{colour:<19}" + " ".join(f"{sum(r):>3}/{len(r):<2}" for r in row))
        m = self.metrics
        lines.append(f"colour {m['colour']:.0%}  direction {m['direction']:.0%}  shape {m['shape']:.0%}  "
                     f"colour+direction {m['colour_and_direction']:.0%}  ({self.clips} clips, {self.seconds:.0f} s)")
        if self.extension:
            e = self.extension
            lines.append(f"extension to {e['frames']:.0f} frames: direction after the window boundary "
                         f"{e['direction_after_boundary']:.0%}, whole clip {e['direction']:.0%}")
        if self.word_effect:
            w = self.word_effect
            lines.append(f"caption words at log-SNR {w['logsnr']:g}: the opposite direction moves the prediction "
                         f"{w['direction_word_effect']:.1%}, another colour {w['colour_word_effect']:.1%}")
        return "\n".join(lines)


def _read_all(videos: torch.Tensor) -> list[Reading]:
    from trainer.video_io import to_uint8_frames

    return [read_clip(to_uint8_frames(v)) for v in videos]


# the direction whose unit step is the negation of each one's (from the renderer's own table)
OPPOSITE_DIRECTION = {d: next(o for o, (ox, oy) in DIRECTIONS.items() if (ox, oy) == (-dx, -dy))
                      for d, (dx, dy) in DIRECTIONS.items()}


@torch.no_grad()
def caption_word_effect(model, encoder, *, frames: int, size: int, logsnr: float = -4.0, seed: int = 0,
                        device="cpu") -> dict[str, float]:
    """How far the denoiser's prediction moves when one caption word changes: the direction word to
    its opposite, or the colour word to another colour (mean relative change over the 16 colour x
    direction prompts, the same noise for all three captions).

    Why: the sign of motion is decided at low SNR (log-SNR about -5 ... -3, docs/motion.md), and a
    model that ignores the direction word there draws the direction by chance. Sample accuracy tells
    that only after a whole sampling run and with +-7 points of noise; this is one forward pass
    per caption and reads 0 exactly when the word is ignored, which the failing demo models nearly do
    (direction 0.3% against colour 16%).
    """
    from trainer.generate import encode_prompts

    colours = list(COLOURS)
    base, opposite, recoloured = [], [], []
    for i, colour in enumerate(colours):
        for direction in DIRECTIONS:
            base.append(f"a {colour} square moving {direction}")
            opposite.append(f"a {colour} square moving {OPPOSITE_DIRECTION[direction]}")
            recoloured.append(f"a {colours[(i + 1) % len(colours)]} square moving {direction}")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(base), 3, frames, size, size, generator=gen).to(device)
    lam = torch.full((len(base),), float(logsnr), device=device)

    def predict(prompts):
        emb, mask = encode_prompts(encoder, prompts)
        return model(z, lam, emb.to(device), mask.to(device)).float().flatten(1)

    ref = predict(base)

    def change(prompts) -> float:
        return ((predict(prompts) - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).mean().item()

    return {"direction_word_effect": change(opposite), "colour_word_effect": change(recoloured),
            "logsnr": float(logsnr)}


def evaluate_synthetic(model, diffusion, encoder, *, frames: int, size: int, seeds: int,
                       sampling: SamplingConfig | dict, extension: bool = False, batch: int = 32, seed: int = 0,
                       device="cpu") -> SyntheticReport:
    """Sample the prompt grid and score what is drawn; deterministic for a given model and seed.

    `sampling` is the sampler settings (a `SamplingConfig`, or a dict of its fields over its defaults);
    extension uses its `reconstruction_weight`. Each chunk of `batch` prompts gets its own noise seed (seed + chunk).
    """
    if isinstance(sampling, dict):
        sampling = SamplingConfig(**sampling)
    from trainer.generate import encode_prompts, generate

    prompts, _ = prompt_grid(seeds)
    emb, mask = encode_prompts(encoder, prompts)
    t0 = time.perf_counter()
    videos, long_videos = [], []
    for chunk, start in enumerate(range(0, len(prompts), batch)):
        sl = slice(start, start + batch)
        kw = dict(frames=frames, height=size, width=size, seed=seed + chunk, device=device, sampling=sampling)
        videos.append(generate(model, diffusion, emb[sl], mask[sl], **kw).cpu())
        if extension:
            long_videos.append(generate(model, diffusion, emb[sl], mask[sl], extend_to=2 * frames, **kw).cpu())
    readings = _read_all(torch.cat(videos))
    ext: dict[str, float] = {}
    if extension:
        long = torch.cat(long_videos)
        # from the last frame of the first window on: the motion across and after the boundary
        after = score(_read_all(long[:, :, frames - 1:]), prompts)
        whole = score(_read_all(long), prompts)
        ext = {"frames": float(2 * frames), "direction_after_boundary": after["direction"],
               "direction": whole["direction"], "colour": whole["colour"]}
    seconds = time.perf_counter() - t0
    effect = caption_word_effect(model, encoder, frames=frames, size=size, seed=seed, device=device)
    return SyntheticReport(score(readings, prompts), prompts, readings, seconds,
                           len(prompts) * (2 if extension else 1), ext, effect)


def motion_kind_grid(seeds: int) -> list[str]:
    """Every colour x motion kind prompt once per seed (shapes in turn; turning ones square or triangle)."""
    prompts = []
    for s in range(seeds):
        for i, colour in enumerate(COLOURS):
            for j, kind in enumerate(MOTION_KINDS):
                shapes = TURNING_SHAPES if kind.startswith("turning") else SHAPES
                prompts.append(motion_caption(colour, shapes[(i + j + s) % len(shapes)], kind))
    return prompts


def evaluate_motion_kinds(model, diffusion, encoder, *, frames: int, size: int, seeds: int,
                          sampling: SamplingConfig, batch: int = 32, seed: int = 0, device="cpu"
                          ) -> tuple[dict[str, float], str]:
    """Sample the colour x motion-kind grid and read each clip's kind and colour back
    (data_pipeline.synthetic_reader.score_motion_kinds): (metrics, a table line per kind)."""
    from data_pipeline.synthetic_reader import score_motion_kinds
    from trainer.generate import encode_prompts, generate
    from trainer.video_io import to_uint8_frames

    prompts = motion_kind_grid(seeds)
    emb, mask = encode_prompts(encoder, prompts)
    videos = []
    for chunk, start in enumerate(range(0, len(prompts), batch)):
        sl = slice(start, start + batch)
        videos.append(generate(model, diffusion, emb[sl], mask[sl], frames=frames, height=size, width=size,
                               seed=seed + chunk, device=device, sampling=sampling).cpu())
    metrics = score_motion_kinds([to_uint8_frames(v) for v in torch.cat(videos)], prompts)
    kinds = "  ".join(f"{k} {metrics[f'motion/{k}']:.0%}" for k in MOTION_KINDS if f"motion/{k}" in metrics)
    table = (f"motion kinds ({len(prompts)} clips): motion {metrics['motion']:.0%}, colour {metrics['colour']:.0%}, "
             f"colour+motion {metrics['colour_and_motion']:.0%}; {kinds}")
    return metrics, table
