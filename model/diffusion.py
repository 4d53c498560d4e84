"""Continuous-time Gaussian diffusion of "Video Diffusion Models" (Ho et al. 2022, section 2).

Everything is written in terms of the log signal-to-noise ratio λ = log(α²/σ²) of a variance-preserving
process z_t = α_t x + σ_t ε, α² = sigmoid(λ), σ² = sigmoid(-λ). Time t ∈ [0, 1] only enters through the
schedule λ(t); the samplers and the loss work on λ directly, so another schedule is one function away.

The math lives in small pure functions (schedule, parameterisation conversions, forward and posterior
Gaussians) so the tests can check each against its closed form; `GaussianDiffusion` only binds the
choices of one run (prediction target, λ range, loss weighting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from model.config import DiffusionConfig

_DEFAULT = DiffusionConfig  # field defaults of the `diffusion:` config section (one source)

PREDICTIONS = ("eps", "v", "x")
LOSS_WEIGHTINGS = ("eps_mse", "v_mse", "x_mse")

Denoiser = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------
def _cosine_ab(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """Shift/scale of the cosine schedule so that λ(0) = logsnr_max and λ(1) = logsnr_min exactly."""
    if not logsnr_min < logsnr_max:
        raise ValueError(f"logsnr_min ({logsnr_min}) must be < logsnr_max ({logsnr_max})")
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return a, b


def cosine_logsnr(t: Tensor | float, logsnr_min: float = _DEFAULT.logsnr_min,
                  logsnr_max: float = _DEFAULT.logsnr_max, shift: float = _DEFAULT.logsnr_shift) -> Tensor:
    """λ(t) = -2 log tan(a t + b) + shift: the cosine schedule (α_t = cos(πt/2)) truncated to [min, max].

    `shift` moves the whole curve in log-SNR ("shifted cosine", Hoogeboom et al. 2023, simple
    diffusion): a negative shift spends more of t, in training and in the sampler's grid, at low
    SNR, where the coarse layout of a clip (where the shape is, which way it moves) is decided. a, b
    are chosen so that λ(0) = max and λ(1) = min exactly whatever the shift.

    Computed in float64 because near t = 1 the tangent argument sits within 1e-4 of π/2, where float32
    rounding visibly moves λ; the result is cast back to the input's float dtype.
    """
    t = torch.as_tensor(t)
    out_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    a, b = _cosine_ab(logsnr_min - shift, logsnr_max - shift)
    lam = -2.0 * torch.log(torch.tan(a * t.to(torch.float64) + b)) + shift
    return lam.clamp(logsnr_min, logsnr_max).to(out_dtype)


def cosine_logsnr_inverse(logsnr: Tensor | float, logsnr_min: float = _DEFAULT.logsnr_min,
                          logsnr_max: float = _DEFAULT.logsnr_max, shift: float = _DEFAULT.logsnr_shift) -> Tensor:
    """t(λ) = (atan(exp(-(λ - shift)/2)) - b) / a, the inverse of `cosine_logsnr` on [min, max]."""
    lam = torch.as_tensor(logsnr)
    out_dtype = lam.dtype if lam.is_floating_point() else torch.get_default_dtype()
    a, b = _cosine_ab(logsnr_min - shift, logsnr_max - shift)
    lam64 = lam.to(torch.float64).clamp(logsnr_min, logsnr_max) - shift
    return ((torch.atan(torch.exp(-0.5 * lam64)) - b) / a).clamp(0.0, 1.0).to(out_dtype)


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """(α, σ) with α² = sigmoid(λ), σ² = sigmoid(-λ); via sigmoid so λ = ±20 neither over- nor underflows."""
    logsnr = torch.as_tensor(logsnr)
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def broadcast_to(coef: Tensor, ref: Tensor) -> Tensor:
    """Per-sample coefficient [B] (or scalar) → shape [B, 1, ..., 1] that broadcasts against `ref`."""
    coef = torch.as_tensor(coef, device=ref.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (ref.ndim - coef.ndim))


# --------------------------------------------------------------------------------------------------
# Parameterisations: z = α x + σ ε, v = α ε - σ x (so x = α z - σ v and ε = σ z + α v)
# --------------------------------------------------------------------------------------------------
def x_from_eps(z: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (z - sigma * eps) / alpha


def x_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * z - sigma * v


def eps_from_x(z: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (z - alpha * x) / sigma


def eps_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma * z + alpha * v


def v_from_x(z: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # α ε - σ x with ε = (z - α x)/σ, folded using α² + σ² = 1
    return (alpha * z - x) / sigma


def v_from_eps(z: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # α ε - σ x with x = (z - σ ε)/α, folded using α² + σ² = 1
    return (eps - sigma * z) / alpha


def v_from_x_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The v-prediction target of the training loss."""
    return alpha * eps - sigma * x


_CONVERT: dict[tuple[str, str], Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    ("eps", "x"): x_from_eps,
    ("v", "x"): x_from_v,
    ("x", "eps"): eps_from_x,
    ("v", "eps"): eps_from_v,
    ("x", "v"): v_from_x,
    ("eps", "v"): v_from_eps,
}


def convert(out: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor, src: str, dst: str) -> Tensor:
    """Convert a prediction between parameterisations ("eps", "v", "x") given z, α, σ (broadcastable)."""
    for name in (src, dst):
        if name not in PREDICTIONS:
            raise ValueError(f"unknown parameterisation {name!r}; valid: {', '.join(PREDICTIONS)}")
    if src == dst:
        return out
    return _CONVERT[(src, dst)](z, out, alpha, sigma)


def error_scale(src: str, dst: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Factor c with (pred - target) in `dst` = c · (pred - target) in `src`, for z held fixed.

    From z = α x + σ ε and v = α ε - σ x: Δx = -(σ/α) Δε, Δv = Δε/α = -Δx/σ.
    """
    factors = {
        ("eps", "x"): -sigma / alpha,
        ("eps", "v"): 1.0 / alpha,
        ("x", "eps"): -alpha / sigma,
        ("x", "v"): -1.0 / sigma,
        ("v", "x"): -sigma,
        ("v", "eps"): alpha,
    }
    if src == dst:
        return torch.ones_like(alpha)
    return factors[(src, dst)]


# --------------------------------------------------------------------------------------------------
# Forward process and its posterior (paper eqs. 1, 3)
# --------------------------------------------------------------------------------------------------
def q_mean_std(x: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """q(z_t | x) = N(α_t x, σ_t² I)."""
    alpha, sigma = alpha_sigma(logsnr)
    return broadcast_to(alpha, x) * x, broadcast_to(sigma, x)


def transition(logsnr_s: Tensor, logsnr_t: Tensor) -> tuple[Tensor, Tensor]:
    """q(z_t | z_s) = N(α_{t|s} z_s, σ²_{t|s} I) for λ_t < λ_s: α_{t|s} = α_t/α_s, σ²_{t|s} = (1 - e^{λ_t-λ_s}) σ_t².

    Returns (α_{t|s}, σ²_{t|s}); `-expm1` keeps the variance accurate when λ_t ≈ λ_s.
    """
    a_s, _ = alpha_sigma(logsnr_s)
    a_t, s_t = alpha_sigma(logsnr_t)
    return a_t / a_s, -torch.expm1(logsnr_t - logsnr_s) * s_t**2


def posterior(z_t: Tensor, x: Tensor, logsnr_t: Tensor, logsnr_s: Tensor) -> tuple[Tensor, Tensor]:
    """q(z_s | z_t, x) = N(μ̃, σ̃² I) for λ_s > λ_t (paper eq. 3).

    μ̃ = e^{λ_t-λ_s} (α_s/α_t) z_t + (1 - e^{λ_t-λ_s}) α_s x,   σ̃² = (1 - e^{λ_t-λ_s}) σ_s².
    Returns (μ̃, σ̃²) with σ̃² shaped to broadcast against z_t.
    """
    a_t, _ = alpha_sigma(logsnr_t)
    a_s, s_s = alpha_sigma(logsnr_s)
    r = torch.exp(logsnr_t - logsnr_s)
    one_minus_r = -torch.expm1(logsnr_t - logsnr_s)
    mean = broadcast_to(r * a_s / a_t, z_t) * z_t + broadcast_to(one_minus_r * a_s, x) * x
    return mean, broadcast_to(one_minus_r * s_s**2, z_t)


def ancestral_variance(logsnr_t: Tensor, logsnr_s: Tensor, gamma: float) -> Tensor:
    """Variance of the ancestral step (paper eq. 4): (σ̃²_{s|t})^{1-γ} (σ²_{t|s})^γ.

    γ = 0 is the true posterior variance, γ = 1 the (larger) forward-transition variance.
    """
    one_minus_r = -torch.expm1(logsnr_t - logsnr_s)
    _, s_s = alpha_sigma(logsnr_s)
    _, s_t = alpha_sigma(logsnr_t)
    log_var = (1.0 - gamma) * torch.log(one_minus_r * s_s**2) + gamma * torch.log(one_minus_r * s_t**2)
    return torch.exp(log_var)


# --------------------------------------------------------------------------------------------------
# The diffusion of one run
# --------------------------------------------------------------------------------------------------
class GaussianDiffusion:
    """Binds the prediction target, the λ range and the loss weighting; stateless otherwise.

    `loss_weighting` names the space the squared error is measured in, whatever the network predicts:
    "eps_mse" = ||ε - ε̂||² = SNR ||x - x̂||², "v_mse" = ||v - v̂||² = (1 + SNR) ||x - x̂||², "x_mse".

    Defaults: runs, CLIs and checkpoints build it with `from_config`, so `DiffusionConfig` (the
    `diffusion:` section) is where a user's defaults live and it always wins. The keyword defaults
    here are that config's. `prediction` has none: a bare construction would read a checkpoint trained
    with the other parameterisation silently wrong (every number finite, every sample noise), so each
    direct caller names it.
    """

    def __init__(
        self,
        prediction: str,
        logsnr_min: float = _DEFAULT.logsnr_min,
        logsnr_max: float = _DEFAULT.logsnr_max,
        loss_weighting: str = _DEFAULT.loss_weighting,
        logsnr_shift: float = _DEFAULT.logsnr_shift,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={loss_weighting!r} is not one of {', '.join(LOSS_WEIGHTINGS)}")
        _cosine_ab(logsnr_min, logsnr_max)  # validates the range
        if not logsnr_min < logsnr_shift < logsnr_max:
            raise ValueError(f"logsnr_shift={logsnr_shift} must lie inside ({logsnr_min}, {logsnr_max})")
        self.logsnr_shift = float(logsnr_shift)
        self.prediction = prediction
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self.loss_weighting = loss_weighting

    @classmethod
    def from_config(cls, cfg: Any) -> GaussianDiffusion:
        return cls(
            prediction=cfg.prediction,
            logsnr_min=cfg.logsnr_min,
            logsnr_max=cfg.logsnr_max,
            loss_weighting=cfg.loss_weighting,
            logsnr_shift=cfg.logsnr_shift,
        )

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(prediction={self.prediction!r}, logsnr=[{self.logsnr_min}, {self.logsnr_max}], "
            f"loss_weighting={self.loss_weighting!r}, logsnr_shift={self.logsnr_shift})"
        )

    # schedule -------------------------------------------------------------------------------------
    def logsnr(self, t: Tensor | float) -> Tensor:
        return cosine_logsnr(t, self.logsnr_min, self.logsnr_max, self.logsnr_shift)

    def t_of_logsnr(self, logsnr: Tensor | float) -> Tensor:
        return cosine_logsnr_inverse(logsnr, self.logsnr_min, self.logsnr_max, self.logsnr_shift)

    # forward process --------------------------------------------------------------------------------
    def q_sample(self, x: Tensor, logsnr: Tensor, noise: Tensor) -> Tensor:
        """z_t = α_t x + σ_t ε; logsnr is [B] (or a scalar)."""
        alpha, sigma = self._coefs(x, logsnr)
        return alpha * x + sigma * noise.to(x.dtype)

    # parameterisation ---------------------------------------------------------------------------------
    def _coefs(self, z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        logsnr = torch.as_tensor(logsnr, device=z.device)
        alpha, sigma = alpha_sigma(logsnr.to(torch.float64))
        return broadcast_to(alpha.to(z.dtype), z), broadcast_to(sigma.to(z.dtype), z)

    def convert(self, out: Tensor, z: Tensor, logsnr: Tensor, dst: str) -> Tensor:
        """Model output (in `self.prediction`) → prediction in `dst`, computed in z's dtype."""
        alpha, sigma = self._coefs(z, logsnr)
        return convert(out.to(z.dtype), z, alpha, sigma, self.prediction, dst)

    def to_x(self, out: Tensor, z: Tensor, logsnr: Tensor) -> Tensor:
        return self.convert(out, z, logsnr, "x")

    def to_eps(self, out: Tensor, z: Tensor, logsnr: Tensor) -> Tensor:
        return self.convert(out, z, logsnr, "eps")

    def to_v(self, out: Tensor, z: Tensor, logsnr: Tensor) -> Tensor:
        return self.convert(out, z, logsnr, "v")

    def from_x(self, x: Tensor, z: Tensor, logsnr: Tensor) -> Tensor:
        """x̂ → the model's own parameterisation (e.g. to build an exact denoiser in tests)."""
        alpha, sigma = self._coefs(z, logsnr)
        return convert(x.to(z.dtype), z, alpha, sigma, "x", self.prediction)

    # loss (paper eq. 2) -------------------------------------------------------------------------------
    def loss_terms(
        self,
        denoiser: Denoiser,
        x: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        **cond: Any,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample weighted MSE [B] (fp32, mean over non-batch dims) and the sampled λ [B].

        The network sees z in x's dtype; the error is formed in fp32 whatever the network returns
        (bf16 outputs would otherwise quantise small errors at high SNR to zero).
        """
        b = x.shape[0]
        if t is None:
            t = torch.rand(b, device=x.device)
        if noise is None:
            noise = torch.randn_like(x)
        logsnr = self.logsnr(t.to(device=x.device, dtype=torch.float32))
        z = self.q_sample(x, logsnr, noise.to(x.dtype))  # coefficients from fp32 λ via float64
        out = denoiser(z, logsnr, **cond)
        if out.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        # Error in the network's own space against an exact target, then scaled into the weighting's
        # space: with z fixed the conversions are affine in the output, so errors map by a factor and
        # no 1/σ or 1/α blows up rounding errors of z.
        x32, n32 = x.float(), noise.float()
        alpha, sigma = alpha_sigma(logsnr.to(device=x.device, dtype=torch.float64))
        alpha, sigma = broadcast_to(alpha, x32), broadcast_to(sigma, x32)
        native = {"eps": n32, "x": x32, "v": v_from_x_eps(x32, n32, alpha.float(), sigma.float())}
        err = out.float() - native[self.prediction]
        scale = error_scale(self.prediction, self.loss_weighting.split("_")[0], alpha, sigma)
        per_sample = (err.square().flatten(1).mean(dim=1).double() * scale.flatten() ** 2).float()
        return per_sample, logsnr

    def loss(self, denoiser: Denoiser, x: Tensor, **cond: Any) -> Tensor:
        per_sample, _ = self.loss_terms(denoiser, x, **cond)
        return per_sample.mean()
