"""Samplers for the continuous-time diffusion (paper section 2): ancestral (eqs. 3/4), DDIM, and
predictor-corrector with a Langevin corrector (eq. 5); classifier-free guidance (eq. 6) and guides
(reconstruction guidance eqs. 7/8, replacement) plug in; `extend` builds long videos window by window.
Classifier-free guidance evaluates both branches in one denoiser call on a doubled batch where the
branches' keywords can be merged (`merge_cfg_batch`), and in two calls otherwise.

The time grid is uniform in t from 1 to 0; λ(t) comes from the diffusion's cosine schedule. The state
z is kept in fp32 (or the dtype asked for) whatever dtype the denoiser returns; per-step coefficients
are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common.config import warn_renamed
from model.config import SAMPLERS, SamplingConfig
from model.diffusion import (
    Denoiser,
    GaussianDiffusion,
    alpha_sigma,
    ancestral_variance,
    eps_from_x,
    posterior,
)
from model.guidance import Guide, ReconstructionGuidance, Replacement, cfg_combine, frame_guide

_DEFAULT = SamplingConfig  # field defaults of the `sampling:` config section (one source; not clip_x)

__all__ = [
    "SAMPLERS",
    "Guide",
    "ReconstructionGuidance",
    "Replacement",
    "ancestral_step",
    "cfg_output",
    "continue_video",
    "ddim_step",
    "extend",
    "langevin_step",
    "merge_cfg_batch",
    "pad_cfg_sequences",
    "sample",
]


def ancestral_step(z_t: Tensor, x_hat: Tensor, logsnr_t: Tensor, logsnr_s: Tensor, gamma: float, noise: Tensor) -> Tensor:
    """z_s = μ̃_{s|t}(z_t, x̂) + sqrt((σ̃²_{s|t})^{1-γ} (σ²_{t|s})^γ) ε  (eqs. 3, 4)."""
    mean, _ = posterior(z_t, x_hat, logsnr_t, logsnr_s)
    std = ancestral_variance(logsnr_t, logsnr_s, gamma).sqrt().to(z_t.dtype)
    return mean + std * noise


def ddim_step(x_hat: Tensor, eps_hat: Tensor, logsnr_s: Tensor) -> Tensor:
    """Deterministic DDIM: z_s = α_s x̂ + σ_s ε̂ (keeps the predicted noise instead of redrawing it)."""
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    return alpha_s.to(x_hat.dtype) * x_hat + sigma_s.to(x_hat.dtype) * eps_hat


def langevin_step(z_s: Tensor, eps_hat: Tensor, sigma_s: Tensor | float, delta: float, noise: Tensor) -> Tensor:
    """One Langevin corrector step on q(z_s) (eq. 5): z_s - ½ δ σ_s ε̂(z_s) + √δ σ_s ε′.

    Derivation: unadjusted Langevin with step η is z ← z + (η/2) ∇log q(z) + √η ε′. The score of the
    noisy marginal is ∇log q(z_s) = -E[ε | z_s]/σ_s ≈ -ε̂/σ_s. Scaling the step to the noise level,
    η = δ σ_s², gives the drift -(δ σ_s²/2)(ε̂/σ_s) = -½ δ σ_s ε̂ and the noise √(δ σ_s²) ε′ = √δ σ_s ε′.
    """
    return z_s - 0.5 * delta * sigma_s * eps_hat + math.sqrt(delta) * sigma_s * noise


def _check_args(sampler: str, steps: int, gamma: float, langevin_delta: float) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {', '.join(SAMPLERS)}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if langevin_delta < 0:
        raise ValueError(f"langevin_delta must be >= 0, got {langevin_delta}")


def _infer_device(guide: Guide | None, cond: dict[str, Any]) -> torch.device:
    """Where the caller's tensors live (guide's x_a, then conditioning tensors); CPU if none."""
    candidates = [getattr(guide, "x_a", None), *cond.values()]
    for c in candidates:
        if torch.is_tensor(c):
            return c.device
    return torch.device("cpu")


# Conditioning sequences whose length may differ between the CFG branches: token key -> its boolean
# mask key (True = real token). A denoiser that honours the mask (SpaceTimeUNet: padded tokens get no
# attention weight) gives the same output for a sequence and its zero-padded, mask-False extension.
PADDABLE_SEQUENCES = {"text_emb": "text_mask"}

# Values that can be shared by both halves of a merged batch when equal: they describe the call, not a
# row (num_video_frames, a None kept in both). Lists, arrays and other containers may be per row, so
# they are never shared.
_SHARED_SCALARS = (type(None), bool, int, float, str)


def pad_cfg_sequences(cond: dict[str, Any], uncond: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """cond, uncond with each PADDABLE_SEQUENCES pair padded to the longer branch's length.

    Why: a negative or empty prompt is usually shorter than the caption; zero tokens with mask False
    let both branches share one batch without changing what the denoiser sees. A pair is padded only
    when both branches hold tensors of the expected form (tokens [B, L, D], bool mask [B, L], equal
    B and D); otherwise it is left as is and `merge_cfg_batch` decides (usually: two calls).
    """
    cond, uncond = dict(cond), dict(uncond)
    for tok_key, mask_key in PADDABLE_SEQUENCES.items():
        pair = [(d.get(tok_key), d.get(mask_key)) for d in (cond, uncond)]
        if not all(_is_token_sequence(tok, mask) for tok, mask in pair):
            continue
        (tok_c, _), (tok_u, _) = pair
        if tok_c.shape[0] != tok_u.shape[0] or tok_c.shape[2] != tok_u.shape[2]:
            continue
        length = max(tok_c.shape[1], tok_u.shape[1])
        for d, (tok, mask) in zip((cond, uncond), pair):
            pad = length - tok.shape[1]
            if pad:
                d[tok_key] = F.pad(tok, (0, 0, 0, pad))  # zeros; F.pad keeps dtype and device
                d[mask_key] = F.pad(mask, (0, pad), value=False)
    return cond, uncond


def _is_token_sequence(tok: Any, mask: Any) -> bool:
    return (torch.is_tensor(tok) and torch.is_tensor(mask) and tok.ndim == 3 and mask.dtype == torch.bool
            and mask.shape == tok.shape[:2])


def merge_cfg_batch(cond: dict[str, Any], uncond: dict[str, Any], batch: int) -> dict[str, Any] | None:
    """Keywords for one denoiser call on the rows [cond; uncond] (2 * batch rows), or None when the
    two branches cannot share a call and must run as two calls.

    Why: CFG needs both branches at the same z every step; one call on a doubled batch (as SGM's
    VanillaCFG does) pays the per-call overhead once and gives the device a fuller batch. It is exact
    when the denoiser treats rows independently (SpaceTimeUNet in eval mode keeps no batch statistics)
    and every tensor keyword is per row, which is what dim 0 == batch is taken to mean. Per key:
    - tensors with dim 0 == batch, equal other dims (after `pad_cfg_sequences`), dtype and device on
      both sides: concatenated along dim 0, cond first;
    - equal scalars (None, bool, int, float, str; e.g. num_video_frames): passed once;
    - anything else (a key on one side only, a tensor against None, a tensor without the batch dim,
      containers): no merge. Falling back keeps every cond/uncond that worked before working.
    The merged call holds twice the activations of one branch at once, and on one CPU thread it was
    not faster at 16 prompts (BENCHMARKS.md); uncond text None still gives two calls.
    """
    if cond.keys() != uncond.keys():
        return None
    cond, uncond = pad_cfg_sequences(cond, uncond)
    merged: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if torch.is_tensor(c) and torch.is_tensor(u):
            if not (c.ndim >= 1 and c.shape[0] == batch and c.shape == u.shape and c.dtype == u.dtype
                    and c.device == u.device):
                return None
            merged[key] = torch.cat([c, u], dim=0)
        elif isinstance(c, _SHARED_SCALARS) and type(c) is type(u) and c == u:
            merged[key] = c
        else:
            return None
    return merged


def cfg_output(
    call: Callable[[Tensor, Tensor, dict[str, Any]], Tensor],
    z: Tensor,
    logsnr: Tensor,
    weight: float,
    cond: dict[str, Any],
    uncond: dict[str, Any],
    merged: dict[str, Any] | None,
) -> Tensor:
    """The guided prediction (eq. 6) at z: one call on [z; z] with the merged keywords when there are
    any (`merge_cfg_batch`), else one call per branch. Differentiable in z either way, so
    reconstruction guidance takes its gradient through both branches."""
    if merged is None:
        out_c, out_u = call(z, logsnr, cond), call(z, logsnr, uncond)
    else:
        out = call(torch.cat([z, z]), torch.cat([logsnr, logsnr]), merged)
        out_c, out_u = out[: z.shape[0]], out[z.shape[0]:]
    return cfg_combine(out_c.to(z.dtype), out_u.to(z.dtype), weight)


# Longer than 60 lines only by its keyword signature (the API in DESIGN.md) and docstring: the body is
# the ~25-line step loop, with prediction in _Predictor; splitting the loop would hide the sampler.
def sample(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...] | torch.Size,
    *,
    steps: int = _DEFAULT.steps,
    sampler: str = _DEFAULT.sampler,
    gamma: float = _DEFAULT.gamma,
    langevin_delta: float = _DEFAULT.langevin_delta,
    guidance_weight: float = _DEFAULT.guidance_weight,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    guide: Guide | None = None,
    generator: torch.Generator | None = None,
    clip_x: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw samples of `shape` by integrating from t = 1 (pure noise) to t = 0 in `steps` steps.

    cond/uncond are keyword arguments for the denoiser's two branches; guidance_weight w ≠ 0 runs both
    and combines them (eq. 6), in one call on a doubled batch when `merge_cfg_batch` can merge their
    keywords (e.g. uncond = zero tokens with an all-False mask), else in two calls (e.g. uncond text
    None). The last step returns x̂(z_{t_1}) (its posterior at λ_max has σ ≈ 5e-5, so this is the
    ancestral step without that noise). Call under torch.no_grad(); reconstruction
    guidance re-enables gradients for its own backward pass.

    Defaults are `SamplingConfig`'s except `clip_x`: this is the exact sampler, so x̂ is clipped to
    [-1, 1] only when asked; `SamplingConfig.clip_x` (on) is the policy its callers apply
    (`cfg.sampling.sample_kwargs()`, `trainer.generate.generate`).
    """
    _check_args(sampler, steps, gamma, langevin_delta)
    cond = dict(cond or {})
    uncond = dict(uncond or {})
    if device is None:
        device = _infer_device(guide, cond)
    shape = tuple(shape)
    lam = diffusion.logsnr(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).to(device)
    predict = _Predictor(denoiser, diffusion, cond, uncond, guidance_weight, guide, clip_x, dtype, shape[0])

    def noise_like(z: Tensor) -> Tensor:
        return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)

    def replaced(z: Tensor, lam_now: Tensor) -> Tensor:
        return z if guide is None else guide.replace(z, lam_now, generator)

    z = replaced(torch.randn(shape, generator=generator, device=device, dtype=dtype), lam[0])
    for i in range(steps):
        lam_t, lam_s = lam[i], lam[i + 1]
        x_hat, eps_hat = predict(z, lam_t)
        if i == steps - 1:
            z = x_hat
            break
        if sampler == "ddim":
            z = ddim_step(x_hat, eps_hat, lam_s)
        else:
            z = ancestral_step(z, x_hat, lam_t, lam_s, gamma, noise_like(z))
        z = replaced(z, lam_s)
        if sampler == "pc" and langevin_delta > 0:
            _, eps_s = predict(z, lam_s)
            z = replaced(langevin_step(z, eps_s, float(alpha_sigma(lam_s)[1]), langevin_delta, noise_like(z)), lam_s)
    return z if guide is None else guide.finalize(z)


class _Predictor:
    """(x̂, ε̂) at z_t for one `sample()` call: the denoiser's output with classifier-free guidance
    (eq. 6), the guide's correction of x̂, and x̂ clipped when asked, in that order."""

    def __init__(self, denoiser: Denoiser, diffusion: GaussianDiffusion, cond: dict[str, Any],
                 uncond: dict[str, Any], guidance_weight: float, guide: Guide | None, clip_x: bool,
                 dtype: torch.dtype, batch: int):
        self.denoiser, self.diffusion, self.guide = denoiser, diffusion, guide
        self.cond, self.uncond, self.weight = cond, uncond, guidance_weight
        self.clip_x, self.dtype, self.batch = clip_x, dtype, batch
        # the two CFG branches as one call on a doubled batch, when their keywords merge
        self.merged = merge_cfg_batch(cond, uncond, batch) if guidance_weight != 0.0 else None

    def call(self, z: Tensor, lam_b: Tensor, kwargs: dict[str, Any]) -> Tensor:
        out = self.denoiser(z, lam_b, **kwargs)
        if out.shape != z.shape:
            raise ValueError(f"denoiser returned shape {tuple(out.shape)} for z of shape {tuple(z.shape)}")
        return out

    def native(self, z: Tensor, lam_b: Tensor) -> Tensor:
        """The network's own output (ε, v or x) at z, guided between the branches when w ≠ 0."""
        if self.weight == 0.0:
            return self.call(z, lam_b, self.cond)
        return cfg_output(self.call, z, lam_b, self.weight, self.cond, self.uncond, self.merged)

    def __call__(self, z: Tensor, lam_t: Tensor) -> tuple[Tensor, Tensor]:
        diffusion, lam_b = self.diffusion, lam_t.to(self.dtype).expand(self.batch)
        eps_hat = None
        if self.guide is None:
            out = self.native(z, lam_b)
            x_hat = diffusion.to_x(out, z, lam_t)
            if not self.clip_x:
                eps_hat = diffusion.to_eps(out, z, lam_t)
        else:
            x_hat = self.guide.predict_x(lambda zz: diffusion.to_x(self.native(zz, lam_b), zz, lam_t), z, lam_t)
        if self.clip_x:
            x_hat = x_hat.clamp(-1.0, 1.0)
        if eps_hat is None:  # ε̂ consistent with the guided or clipped x̂
            alpha, sigma = alpha_sigma(lam_t)
            eps_hat = eps_from_x(z, x_hat, alpha.to(z.dtype), sigma.to(z.dtype))
        return x_hat, eps_hat


def extend(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    window_shape: tuple[int, int, int, int, int],
    total_frames: int,
    *,
    context_frames: int | None = None,
    guidance: str = "reconstruction",
    reconstruction_weight: float = _DEFAULT.reconstruction_weight,
    **sample_kwargs: Any,
) -> Tensor:
    """Long video [B, C, total_frames, H, W] from overlapping windows of window_shape[2] frames.

    The first window is sampled freely; each next one is conditioned (reconstruction guidance or
    replacement) on the last `context_frames` frames generated so far (default half a window; the
    last window takes more context so every window has the full length), and only its new frames are
    kept. `guide_weight=`, the old name of `reconstruction_weight=`, still works with a RenamedWarning.
    """
    b, c, t, h, w = window_shape
    if context_frames is None:
        context_frames = t // 2
    if not 0 < context_frames < t:
        raise ValueError(f"context_frames={context_frames} must be in [1, {t - 1}] for windows of {t} frames")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if "guide_weight" in sample_kwargs:  # the old name, read like guidance_weight (classifier-free)
        warn_renamed("extend(guide_weight=)", "extend(reconstruction_weight=)", SamplingConfig.RENAMED_WHY)
        reconstruction_weight = sample_kwargs.pop("guide_weight")
    if "guide" in sample_kwargs:
        raise ValueError("extend() builds its own guide; pass guidance=/reconstruction_weight= instead")
    video = sample(denoiser, diffusion, window_shape, **sample_kwargs)
    return continue_video(denoiser, diffusion, video, window_shape, total_frames, context_frames=context_frames,
                          guidance=guidance, reconstruction_weight=reconstruction_weight, **sample_kwargs)


def continue_video(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    video: Tensor,
    window_shape: tuple[int, int, int, int, int],
    total_frames: int,
    *,
    context_frames: int,
    guidance: str = "reconstruction",
    reconstruction_weight: float = _DEFAULT.reconstruction_weight,
    **sample_kwargs: Any,
) -> Tensor:
    """`video` [B, C, F, H, W] continued to total_frames, window by window: each window of
    window_shape[2] frames observes the last frames so far through the prediction operator
    (`frame_guide`: the first frames of the window) and adds the rest.

    Extension continues the model's own first window; prediction continues observed real frames (F may
    be shorter than a window: the first window then observes all F). A window observes
    `context_frames` frames, more in the last one so every window has the full length.
    """
    t = window_shape[2]
    if not 0 < context_frames < t:
        raise ValueError(f"context_frames={context_frames} must be in [1, {t - 1}] for windows of {t} frames")
    while video.shape[2] < total_frames:
        n_new = min(t - context_frames, total_frames - video.shape[2])
        k = min(t - n_new, video.shape[2])
        guide = frame_guide(video[:, :, -k:], t, guidance, reconstruction_weight)
        window = sample(denoiser, diffusion, window_shape, guide=guide, **sample_kwargs)
        video = torch.cat([video, window[:, :, k:].to(video.dtype)], dim=2)
    return video[:, :, :total_frames]
