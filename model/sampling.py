"""Samplers for the continuous-time diffusion (paper section 2): ancestral (eqs. 3/4), DDIM, and
predictor-corrector with a Langevin corrector (eq. 5); classifier-free guidance (eq. 6) and guides
(reconstruction guidance eqs. 7/8, replacement) plug in; `extend` builds long videos window by window.

The time grid is uniform in t from 1 to 0; λ(t) comes from the diffusion's cosine schedule. The state
z is kept in fp32 (or the dtype asked for) whatever dtype the denoiser returns; per-step coefficients
are computed in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from model.diffusion import (
    Denoiser,
    GaussianDiffusion,
    alpha_sigma,
    ancestral_variance,
    eps_from_x,
    posterior,
)
from model.guidance import ReconstructionGuidance, Replacement, cfg_combine, frame_guide

SAMPLERS = ("ancestral", "ddim", "pc")

__all__ = [
    "SAMPLERS",
    "ReconstructionGuidance",
    "Replacement",
    "ancestral_step",
    "ddim_step",
    "extend",
    "langevin_step",
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


def _infer_device(guide: Any, cond: dict[str, Any]) -> torch.device:
    """Where the caller's tensors live (guide's x_a, then conditioning tensors); CPU if none."""
    candidates = [getattr(guide, "x_a", None), *cond.values()]
    for c in candidates:
        if torch.is_tensor(c):
            return c.device
    return torch.device("cpu")


def sample(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...] | torch.Size,
    *,
    steps: int = 256,
    sampler: str = "ancestral",
    gamma: float = 0.3,
    langevin_delta: float = 0.1,
    guidance_weight: float = 0.0,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    guide: ReconstructionGuidance | Replacement | None = None,
    generator: torch.Generator | None = None,
    clip_x: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw samples of `shape` by integrating from t = 1 (pure noise) to t = 0 in `steps` steps.

    cond/uncond are keyword arguments for the denoiser's two branches; guidance_weight w ≠ 0 runs both
    and combines them (eq. 6). The last step returns x̂(z_{t_1}) (its posterior at λ_max has σ ≈ 5e-5,
    so this is the ancestral step without that noise). Call under torch.no_grad(); reconstruction
    guidance re-enables gradients for its own backward pass.
    """
    _check_args(sampler, steps, gamma, langevin_delta)
    cond = dict(cond or {})
    uncond = dict(uncond or {})
    if device is None:
        device = _infer_device(guide, cond)
    shape = tuple(shape)
    lam = diffusion.logsnr(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).to(device)

    def call(z: Tensor, lam_b: Tensor, kwargs: dict[str, Any]) -> Tensor:
        out = denoiser(z, lam_b, **kwargs)
        if out.shape != z.shape:
            raise ValueError(f"denoiser returned shape {tuple(out.shape)} for z of shape {tuple(z.shape)}")
        return out

    def predict_native(z: Tensor, lam_b: Tensor) -> Tensor:
        out = call(z, lam_b, cond)
        if guidance_weight != 0.0:
            out = cfg_combine(out.to(z.dtype), call(z, lam_b, uncond).to(z.dtype), guidance_weight)
        return out

    def predict(z: Tensor, lam_t: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂, ε̂) at z_t with CFG, the guide's correction and optional clipping applied."""
        lam_b = lam_t.to(dtype).expand(shape[0])
        if guide is None:
            out = predict_native(z, lam_b)
            x_hat = diffusion.to_x(out, z, lam_t)
            eps_hat = None if clip_x else diffusion.to_eps(out, z, lam_t)
        else:
            x_hat = guide.predict_x(lambda zz: diffusion.to_x(predict_native(zz, lam_b), zz, lam_t), z, lam_t)
            eps_hat = None
        if clip_x:
            x_hat = x_hat.clamp(-1.0, 1.0)
        if eps_hat is None:
            alpha, sigma = alpha_sigma(lam_t)
            eps_hat = eps_from_x(z, x_hat, alpha.to(z.dtype), sigma.to(z.dtype))
        return x_hat, eps_hat

    def noise_like(z: Tensor) -> Tensor:
        return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)

    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if guide is not None:
        z = guide.replace(z, lam[0], generator)
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
        if guide is not None:
            z = guide.replace(z, lam_s, generator)
        if sampler == "pc" and langevin_delta > 0:
            _, eps_s = predict(z, lam_s)
            sigma_s = float(alpha_sigma(lam_s)[1])
            z = langevin_step(z, eps_s, sigma_s, langevin_delta, noise_like(z))
            if guide is not None:
                z = guide.replace(z, lam_s, generator)
    if guide is not None:
        z = guide.finalize(z)
    return z


def extend(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    window_shape: tuple[int, int, int, int, int],
    total_frames: int,
    *,
    context_frames: int | None = None,
    guidance: str = "reconstruction",
    guide_weight: float = 4.0,
    **sample_kwargs: Any,
) -> Tensor:
    """Long video [B, C, total_frames, H, W] from overlapping windows of window_shape[2] frames.

    The first window is sampled freely; each next one is conditioned (reconstruction guidance or
    replacement) on the last `context_frames` frames generated so far (default half a window; the
    last window takes more context so every window has the full length), and only its new frames are
    kept.
    """
    b, c, t, h, w = window_shape
    if context_frames is None:
        context_frames = t // 2
    if not 0 < context_frames < t:
        raise ValueError(f"context_frames={context_frames} must be in [1, {t - 1}] for windows of {t} frames")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if "guide" in sample_kwargs:
        raise ValueError("extend() builds its own guide; pass guidance=/guide_weight= instead")
    video = sample(denoiser, diffusion, window_shape, **sample_kwargs)
    while video.shape[2] < total_frames:
        n_new = min(t - context_frames, total_frames - video.shape[2])
        k = t - n_new
        guide = frame_guide(video[:, :, -k:], t, guidance, guide_weight)
        window = sample(denoiser, diffusion, window_shape, guide=guide, **sample_kwargs)
        video = torch.cat([video, window[:, :, k:].to(video.dtype)], dim=2)
    return video[:, :, :total_frames]
