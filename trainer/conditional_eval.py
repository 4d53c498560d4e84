"""Scores of conditional generation against held-out truth: each task (trainer.conditional) is given
what its operator observes of a held-out clip, the completed clip is compared with the clip itself,
and so is the simple baseline the task must beat:

- predict: repeat the last observed frame;
- interpolate: blend the two observed neighbours linearly (by distance);
- upsample: bicubic upsampling of each low-resolution frame.

PSNR and SSIM are measured on the frames the model generates (`Task.generated_frames`: for
interpolation those between two observed frames; the observed ones are identical for both). FVD of
the completed clips against the true ones when a detector is given (trainer/fvd.py); for the synthetic
demo data the reader (data_pipeline.synthetic_reader) says whether the completed clips keep the
colour and direction of the truth. Used by `trainer.evaluate --task` and the training loop's eval.tasks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.conditional import Task, complete

BASELINES = {"predict": "repeat last frame", "interpolate": "linear blend", "upsample": "bicubic"}


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per clip PSNR in dB of videos [B, C, T, H, W] in [-1, 1] (peak-to-peak 2); identical clips give inf."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def _gaussian_window(size: int, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    return torch.outer(g, g)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per clip SSIM (Wang et al. 2004) of videos [B, C, T, H, W] in [-1, 1]: on [0, 1] images, a
    Gaussian window (σ 1.5; 11 px, or the largest odd size the frame holds), valid positions, the mean
    over channels, frames and positions."""
    b, c, t, h, w = x.shape
    size = min(11, h - (1 - h % 2), w - (1 - w % 2))
    win = _gaussian_window(size).to(x.device)[None, None].expand(c, 1, size, size)
    a = ((x.float() + 1) / 2).transpose(1, 2).reshape(b * t, c, h, w)
    o = ((y.float() + 1) / 2).transpose(1, 2).reshape(b * t, c, h, w)

    def blur(v: Tensor) -> Tensor:
        return F.conv2d(v, win, groups=c)

    mu_a, mu_o = blur(a), blur(o)
    var_a, var_o = blur(a * a) - mu_a**2, blur(o * o) - mu_o**2
    cov = blur(a * o) - mu_a * mu_o
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_o + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_o**2 + c1) * (var_a + var_o + c2))
    return s.reshape(b, -1).mean(1)


def baseline(task: Task, observed: Tensor) -> Tensor:
    """The task's simple baseline from what is observed of a window [B, C, window, H, W]."""
    if task.name == "predict":
        k = observed.shape[2]
        return torch.cat([observed, observed[:, :, -1:].expand(-1, -1, task.window - k, -1, -1)], dim=2)
    if task.name == "interpolate":
        f, n = task.factor, observed.shape[2]
        frames = []
        for i in range(task.window):
            j, r = divmod(i, f)
            if j >= n - 1:  # at or after the last observed frame: nothing to blend with
                frames.append(observed[:, :, n - 1])
            else:
                frames.append(((f - r) * observed[:, :, j] + r * observed[:, :, j + 1]) / f)
        return torch.stack(frames, dim=2)
    b, c, t, h, w = observed.shape
    flat = observed.transpose(1, 2).reshape(b * t, c, h, w)
    up = F.interpolate(flat, scale_factor=task.factor, mode="bicubic", align_corners=False)
    return up.reshape(b, t, c, h * task.factor, w * task.factor).transpose(1, 2).clamp(-1, 1)


def observed_for_display(task: Task, observed: Tensor) -> Tensor:
    """What a task observes of one clip [C, n, h, w], laid out as the full clip [C, window, H, W] for
    a picture: unobserved frames black (-1), low-resolution frames repeated up to full size."""
    c = observed.shape[0]
    if task.name == "upsample":
        return task.operator().lift(observed[None])[0]
    shown = torch.full((c, task.window, task.size, task.size), -1.0, dtype=observed.dtype)
    shown[:, task.operator().indices] = observed
    return shown


def write_examples(examples: dict[str, dict[str, Tensor]], tasks: dict[str, Task], out_dir) -> list:
    """One held-out clip per task as uint8 [T, H, W, 3] arrays (no pickle): {task}.{observed,completed,
    truth}.npy in out_dir, the observed part laid out by `observed_for_display`."""
    import numpy as np

    from trainer.video_io import to_uint8_frames

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ex in examples.items():
        shown = {"observed": observed_for_display(tasks[name], ex["observed"]), "completed": ex["completed"],
                 "truth": ex["truth"]}
        for part, video in shown.items():
            path = out_dir / f"{name}.{part}.npy"
            np.save(path, to_uint8_frames(video), allow_pickle=False)
            written.append(path)
    return written


@dataclass
class TaskReport:
    metrics: dict[str, float] = field(default_factory=dict)  # tag (without "eval/") -> value
    info: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    examples: dict[str, Tensor] = field(default_factory=dict)  # observed / completed / truth of the first clip


def _reads(videos: Tensor) -> list:
    from data_pipeline.synthetic_reader import read_clip
    from trainer.video_io import to_uint8_frames

    return [read_clip(to_uint8_frames(v)) for v in videos]


def reader_agreement(task: Task, completed: Tensor, truth: Tensor) -> dict[str, float]:
    """Share of clips whose completion reads (data_pipeline.synthetic_reader) the colour and direction
    that the truth reads. For predict only the generated frames count, from the last observed one on
    (so the motion read is the model's); clips whose truth reads no direction are left out."""
    if task.name == "predict":
        k = task.observed_frames - 1
        completed, truth = completed[:, :, k:], truth[:, :, k:]
    got, want = _reads(completed), _reads(truth)
    pairs = [(g, t) for g, t in zip(got, want) if t.direction is not None]
    n = max(len(pairs), 1)
    return {"direction_acc": sum(g.direction == t.direction for g, t in pairs) / n,
            "colour_acc": sum(g.colour == t.colour for g, t in pairs) / n, "reader_clips": float(len(pairs))}


def evaluate_task(model, diffusion, task: Task, clips, *, sampling, seed: int = 0, batch: int = 32,
                  captions: bool = True, reader: bool = False, extractor=None, guidance: str = "reconstruction",
                  device: torch.device | str = "cpu") -> TaskReport:
    """Complete every held-out clip of `clips` (batches of (video [B, C, T, H, W], text_emb, text_mask),
    T = the task's window) from what the task observes of it, and score it against the clip and the
    baseline. captions: condition on each clip's own caption (False: no caption). Deterministic for a
    given model and seed (batch i uses seed + i)."""
    report = TaskReport()
    t0 = time.perf_counter()
    scores: dict[str, list[Tensor]] = {k: [] for k in ("psnr", "psnr_base", "ssim", "ssim_base")}
    completed_all, truth_all = [], []
    real_stats = fake_stats = None
    if extractor is not None:
        from trainer.fvd import FeatureStats

        real_stats, fake_stats = FeatureStats(), FeatureStats()
    gen = task.generated_frames()
    for i, (truth, emb, mask) in enumerate(clips):
        truth = truth[:, :, :task.window].float()
        observed = task.observe(truth)
        done = complete(model, diffusion, task, observed, sampling=sampling, text_emb=emb if captions else None,
                        text_mask=mask if captions else None, seed=seed + i, guidance=guidance, batch=batch,
                        device=device).cpu()
        if task.name == "interpolate":  # the window's frames after the last observed one (not scored)
            done = torch.cat([done, baseline(task, observed)[:, :, done.shape[2]:]], dim=2)
        base = baseline(task, observed)
        scores["psnr"].append(psnr(done[:, :, gen], truth[:, :, gen]))
        scores["psnr_base"].append(psnr(base[:, :, gen], truth[:, :, gen]))
        scores["ssim"].append(ssim(done[:, :, gen], truth[:, :, gen]))
        scores["ssim_base"].append(ssim(base[:, :, gen], truth[:, :, gen]))
        if reader:
            completed_all.append(done)
            truth_all.append(truth)
        if extractor is not None:
            real_stats.update(extractor.features(truth.to(extractor.device)))
            fake_stats.update(extractor.features(done.to(extractor.device)))
        if i == 0:
            report.examples = {"observed": observed[0], "completed": done[0], "baseline": base[0], "truth": truth[0]}
    name = task.name
    n = sum(s.shape[0] for s in scores["psnr"])
    if n == 0:
        raise ValueError(f"{name}: no held-out clips to evaluate")
    mean = {k: _finite_mean(torch.cat(v)) for k, v in scores.items()}
    m = report.metrics
    m.update({f"{name}_psnr": mean["psnr"], f"{name}_psnr_baseline": mean["psnr_base"],
              f"{name}_ssim": mean["ssim"], f"{name}_ssim_baseline": mean["ssim_base"]})
    report.info[f"{name}_setup"] = _setup(task, n, seed, captions, guidance, sampling.reconstruction_weight)
    line = (f"{name} ({report.info[f'{name}_setup']}): PSNR {mean['psnr']:.2f} dB vs {mean['psnr_base']:.2f} "
            f"({BASELINES[name]}), SSIM {mean['ssim']:.3f} vs {mean['ssim_base']:.3f}")
    if reader:
        agree = reader_agreement(task, torch.cat(completed_all), torch.cat(truth_all))
        m.update({f"{name}_{k}": v for k, v in agree.items()})
        line += (f"; keeps the truth's direction in {agree['direction_acc']:.0%}, colour in {agree['colour_acc']:.0%}"
                 f" ({agree['reader_clips']:.0f} clips)")
    if extractor is not None:
        from trainer.fvd import fvd_from_stats

        m[f"{name}_fvd"] = fvd_from_stats(real_stats, fake_stats)
        report.info[f"{name}_fvd_detector"] = extractor.name
        line += f"; FVD {m[f'{name}_fvd']:.2f} ({n} clips, seed {seed}, {extractor.name})"
    m[f"{name}_seconds"] = time.perf_counter() - t0
    report.lines.append(line)
    return report


def _finite_mean(v: Tensor) -> float:
    """Mean of per-clip scores; an exact clip's inf PSNR is capped at 100 dB so one cannot swamp the rest."""
    return float(v.clamp(max=100.0).mean()) if v.numel() else math.nan


def _setup(task: Task, n: int, seed: int, captions: bool, guidance: str, weight: float) -> str:
    what = {"predict": f"{task.observed_frames} of {task.window} frames observed",
            "interpolate": f"every {task.factor}th frame observed",
            "upsample": f"{task.observed_size}x{task.observed_size} -> {task.size}x{task.size}"}[task.name]
    how = f"{guidance} w_r={weight:g}" if guidance == "reconstruction" else guidance
    return f"{what}, {n} clips, seed {seed}, {how}, {'captions' if captions else 'no captions'}"
