"""The exact denoiser for Gaussian data, the reference that the samplers are checked against.

For x ~ N(μ, Σ) and z = α x + σ ε the posterior mean is closed form,
    E[x | z] = μ + α Σ (α² Σ + σ² I)⁻¹ (z - α μ),
so a sampler fed with it must reproduce N(μ, Σ) up to its own discretisation error. Σ is over the
flattened non-batch dims (C·T·H·W); tests keep those tiny (e.g. C=1, T=4, H=W=1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.diffusion import PREDICTIONS, alpha_sigma


class GaussianDenoiser:
    """denoiser(z, logsnr, mean=None) → prediction of an optimal network for data N(mean or μ, Σ).

    `mean` (per call, [D] or [B, D] or shaped like one sample) lets tests build conditional branches
    (classifier-free guidance) that share Σ. Predictions are formed from the eigenbasis of Σ, directly
    in each parameterisation, so they stay accurate at both ends of the λ range.
    """

    def __init__(self, mu: Tensor, cov: Tensor, prediction: str = "eps") -> None:
        self.mu = mu.flatten()
        self.cov = cov
        d = self.mu.numel()
        if cov.shape != (d, d):
            raise ValueError(f"cov must be [{d}, {d}] for a mean of {d} elements, got {tuple(cov.shape)}")
        evals, evecs = torch.linalg.eigh(cov)
        if evals.min() < 0:
            raise ValueError("cov must be positive semi-definite")
        self.evals, self.evecs = evals, evecs
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")
        self.prediction = prediction
        self.calls = 0

    def __call__(self, z: Tensor, logsnr: Tensor, mean: Tensor | None = None) -> Tensor:
        self.calls += 1
        b = z.shape[0]
        dtype = self.evecs.dtype
        zf = z.reshape(b, -1).to(dtype)
        mu = self.mu if mean is None else mean.reshape(-1, self.mu.numel()).to(dtype)
        alpha, sigma = alpha_sigma(torch.as_tensor(logsnr, dtype=torch.float64, device=z.device).expand(b))
        alpha, sigma = alpha.to(dtype)[:, None], sigma.to(dtype)[:, None]
        r = (zf - alpha * mu) @ self.evecs  # residual in the eigenbasis
        denom = alpha**2 * self.evals + sigma**2
        x_hat = mu + (r * (alpha * self.evals / denom)) @ self.evecs.T
        eps_hat = (r * (sigma / denom)) @ self.evecs.T
        if self.prediction == "x":
            out = x_hat
        elif self.prediction == "eps":
            out = eps_hat
        else:
            out = alpha * eps_hat - sigma * x_hat  # v = α ε - σ x
        return out.reshape(z.shape).to(z.dtype)
