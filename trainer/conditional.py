"""Conditional generation from observed video (paper section 3.1): prediction, frame interpolation and
spatial super-resolution with one code path.

Each task is an observation operator (`model.observation`) and the observed tensor, turned into a
guide by `model.guidance.observation_guide` (reconstruction guidance, or the replacement baseline):

- predict: the first K frames are observed, the model generates the rest of the window and, past
  it, continues window by window (`model.sampling.continue_video`, the same loop as extension);
- interpolate: every F-th frame of a window is observed (frames 0, F, 2F, ...); the output has F
  times the frame rate. Windows overlap in one observed frame and are sampled as one batch, since
  each generated frame is conditioned on its observed neighbours only;
- upsample: a video at 1/s of the model's resolution is observed through s x s average pooling; the
  model generates at its own resolution (eq. 8), windows of the model's frame count in one batch.

Used by `trainer.sample --condition`, `trainer.evaluate --task` (and the training loop's eval.tasks)
and the demo, so a number measured there is what the CLI produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from model.config import SamplingConfig
from model.diffusion import GaussianDiffusion
from model.guidance import GUIDANCE_KINDS, observation_guide
from model.observation import AveragePool, FrameSelection
from model.sampling import continue_video, sample

TASKS = ("predict", "interpolate", "upsample")


@dataclass(frozen=True)
class Task:
    """One conditional task for a model with windows of `window` frames of `size` x `size` pixels.

    factor: interpolate's frame-rate factor F or upsample's spatial factor s; observed_frames:
    predict's K (default half a window).
    """

    name: str
    window: int
    size: int
    factor: int = 2
    observed_frames: int = 0

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task {self.name!r} is not one of {', '.join(TASKS)}")
        if self.name == "predict" and not self.observed_frames:
            object.__setattr__(self, "observed_frames", self.window // 2)
        self.operator()  # the operator's own checks name what is wrong

    @property
    def observed_size(self) -> int:
        """Side of the observed frames (the low resolution for upsample)."""
        return self.size // self.factor if self.name == "upsample" else self.size

    def operator(self):
        """The observation operator on one window."""
        if self.name == "predict":
            return FrameSelection.first(self.observed_frames, self.window)
        if self.name == "interpolate":
            return FrameSelection.every(self.factor, self.window)
        if self.size % self.factor:
            raise ValueError(f"upsample factor {self.factor} does not divide the model's size {self.size}")
        return AveragePool(self.factor)

    def observe(self, clip: Tensor) -> Tensor:
        """What the model is given of a true clip [B, C, window, H, W] (evaluation)."""
        return self.operator().observe(clip)

    def output_fps(self, fps: float) -> float:
        return fps * self.factor if self.name == "interpolate" else fps

    def generated_frames(self) -> list[int]:
        """The frames of a window the model generates and evaluation scores: after the observed ones
        (predict), between two observed ones (interpolate; a frame after the last observed one would
        be prediction), or all (upsample)."""
        if self.name == "predict":
            return list(range(self.observed_frames, self.window))
        if self.name == "interpolate":
            last = self.operator().indices[-1]
            return [i for i in range(last) if i % self.factor]
        return list(range(self.window))


def _window_starts(n: int, length: int, step: int) -> list[int]:
    """Starts of windows of `length` items over n items, `step` apart, the last one moved back to end at
    the last item (so every window is full and every item covered)."""
    if n <= length:
        return [0]
    starts = list(range(0, n - length, step))
    return starts + [n - length]


@torch.no_grad()
def complete(model: nn.Module, diffusion: GaussianDiffusion, task: Task, observed: Tensor, *,
             sampling: SamplingConfig, text_emb: Tensor | None = None, text_mask: Tensor | None = None,
             seed: int = 0, total_frames: int | None = None, guidance: str = "reconstruction",
             batch: int = 32, device: torch.device | str = "cpu", cfg_batched: bool | None = None) -> Tensor:
    """The video [B, C, T_out, H, W] in [-1, 1] that `observed` [B, C, N, h, w] (in [-1, 1]) is part of.

    predict: N < window observed frames, T_out = total_frames (default one window).
    interpolate: N observed frames, T_out = factor (N - 1) + 1.
    upsample: N frames at size/factor, T_out = N at full size (N < window: the last frame is repeated
    to fill the window and the repeats dropped again).
    Sampler settings from `sampling` (its reconstruction_weight is w_r); captions are optional (None:
    the model's null branch). Deterministic for a given seed. `batch`: windows per sampler call.
    """
    from trainer.generate import eval_mode, sampling_setup

    if guidance not in GUIDANCE_KINDS:
        raise ValueError(f"guidance={guidance!r} is not one of {', '.join(GUIDANCE_KINDS)}")
    b, c, n, h, w = observed.shape
    if h != task.observed_size or w != task.observed_size:
        raise ValueError(f"{task.name}: observed frames are {h}x{w}, expected {task.observed_size}x{task.observed_size}")
    device = torch.device(device)
    observed = observed.to(device=device, dtype=torch.float32)
    generator = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(model):
        if task.name == "predict":
            if not 0 < n < task.window:
                raise ValueError(f"predict: {n} observed frames; need 1 to {task.window - 1} for windows of "
                                 f"{task.window} frames")
            denoiser, kwargs = sampling_setup(model, sampling, text_emb, text_mask, device, cfg_batched)
            out = continue_video(denoiser, diffusion, observed, (b, c, task.window, task.size, task.size),
                                 total_frames or task.window, context_frames=n, guidance=guidance,
                                 reconstruction_weight=sampling.reconstruction_weight, generator=generator, **kwargs)
        else:
            out = _complete_windows(model, diffusion, task, observed, sampling, text_emb, text_mask, generator,
                                    guidance, batch, device, cfg_batched)
    return out.clamp(-1, 1)


def _complete_windows(model, diffusion, task: Task, observed: Tensor, sampling: SamplingConfig, text_emb, text_mask,
                      generator, guidance: str, batch: int, device, cfg_batched) -> Tensor:
    """interpolate / upsample: independent windows, sampled `batch` at a time, laid into the output."""
    from trainer.generate import sampling_setup

    b, c, n, _, _ = observed.shape
    op = task.operator()
    if task.name == "interpolate":
        per_window = len(op.indices)  # observed frames per window; neighbouring windows share one
        if n < 2:
            raise ValueError("interpolate: needs at least 2 observed frames")
        if n < per_window:  # a short input: one window observing fewer frames
            op, per_window = FrameSelection(range(0, task.factor * (n - 1) + 1, task.factor), task.window), n
        starts = _window_starts(n, per_window, per_window - 1)
        out_frames, spacing = task.factor * (n - 1) + 1, task.factor
    else:
        per_window = task.window
        if n < per_window:
            observed = torch.cat([observed, observed[:, :, -1:].expand(-1, -1, per_window - n, -1, -1)], dim=2)
        starts = _window_starts(n, per_window, per_window)
        out_frames, spacing = max(n, per_window), 1
    # rows: every window of every video, video-major
    rows = torch.cat([observed[:, :, s:s + per_window] for s in starts], dim=0)  # [len(starts) * b, ...]
    row_video = torch.arange(b).repeat(len(starts))
    done = []
    for lo in range(0, rows.shape[0], batch):
        y = rows[lo:lo + batch]
        idx = row_video[lo:lo + batch]
        emb = None if text_emb is None else text_emb[idx]
        mask = None if text_mask is None else text_mask[idx]
        denoiser, kwargs = sampling_setup(model, sampling, emb, mask, device, cfg_batched)
        guide = observation_guide(op, y, guidance, sampling.reconstruction_weight)
        done.append(sample(denoiser, diffusion, (y.shape[0], c, task.window, task.size, task.size), guide=guide,
                           generator=generator, **kwargs))
    windows = torch.cat(done).reshape(len(starts), b, c, task.window, task.size, task.size)
    out = torch.empty((b, c, out_frames, task.size, task.size), dtype=windows.dtype, device=windows.device)
    span = spacing * (per_window - 1) + 1  # output frames one window covers
    for window, s in zip(windows, starts):
        out[:, :, spacing * s:spacing * s + span] = window[:, :, :span]
    return out if task.name == "interpolate" else out[:, :, :n]  # without the repeats that filled a window


def load_condition_video(path: str | Path, task: Task, *, frames: int, fps: float) -> Tensor:
    """The first `frames` frames (or as many as the video has) of a video file, decoded, resized and center-cropped by the data pipeline's own clip decoder at `fps`, to the
    task's observed size: float [1, 3, N, h, w] in [-1, 1], as the loader gives training clips."""
    from data_pipeline.config import ClipConfig
    from data_pipeline.loader import to_unit_range
    from data_pipeline.video import DecodeError, decode_clips

    side = task.observed_size
    cfg = ClipConfig(frames=frames, fps=fps, height=side, width=side, too_short="pad")
    try:
        _, clips = decode_clips(str(path), cfg)
    except DecodeError as e:
        raise ValueError(f"{path}: cannot use as the observed video: {e}") from None
    clip = clips[0]
    real = clip.frames[:frames - clip.padded] if clip.padded else clip.frames  # padding is not observed
    return to_unit_range(real[None])
