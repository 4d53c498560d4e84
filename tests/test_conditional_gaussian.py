"""Conditional generation checked against the exact Gaussian conditional, one test per observation operator.

For x ~ N(0, Σ) observed through a linear operator H as y = H x, the truth is closed form:
    E[x | y] = Σ Hᵀ (H Σ Hᵀ)⁻¹ y,    Cov[x | y] = Σ − Σ Hᵀ (H Σ Hᵀ)⁻¹ H Σ.
With the exact denoiser (testing.gaussian_denoiser) every gap between the guided sampler's moments and
these is the guide's own error. Reconstruction guidance with a constant w_r is an approximation (the
ideal weight grows with the noise level; docs/diffusion.md), so the tolerances are what it achieves
at the default w_r = 4, ancestral sampler, 100 steps, 4000 samples (Monte Carlo standard error of a
mean ≈ 0.005):
- mean: the largest error of any coordinate < MEAN_TOL (≈ 5% of the conditional shift, ~1.2);
- covariance: ‖Ĉ − C‖_F < COV_TOL · ‖Σ − C‖_F, i.e. the samples moved at least 90% of the way from
  the prior's covariance to the conditional one;
- the observed part is y exactly;
- replacement (the baseline) misses the mean by more than REPLACEMENT_FACTOR times as much.
"""

from __future__ import annotations

import pytest
import torch

from model.diffusion import GaussianDiffusion
from model.guidance import ProjectionReplacement, Replacement, observation_guide, replacement_for
from model.observation import AveragePool, FrameSelection, observation_matrix
from model.sampling import sample
from testing.gaussian_denoiser import GaussianDenoiser

F64 = torch.float64
N, STEPS, WEIGHT = 4_000, 100, 4.0
MEAN_TOL, COV_TOL, REPLACEMENT_FACTOR = 0.06, 0.1, 1.6

pytestmark = pytest.mark.usefixtures("one_thread")


def ar1_cov(t: int, rho: float, var: float) -> torch.Tensor:
    idx = torch.arange(t, dtype=F64)
    return var * rho ** (idx[:, None] - idx[None, :]).abs()


# (operator, one sample's shape [1, C, T, H, W], prior covariance over its C·T·H·W values)
CASES = {
    "predict": (FrameSelection.first(4, 8), (1, 1, 8, 1, 1), ar1_cov(8, 0.95, 0.3)),
    "interpolate": (FrameSelection.every(3, 8), (1, 1, 8, 1, 1), ar1_cov(8, 0.8, 0.3)),
    # a 4x4 image with separable AR(1) rows and columns, observed as its 2x2 block means
    "upsample": (AveragePool(2), (1, 1, 1, 4, 4), 0.3 * torch.kron(ar1_cov(4, 0.6, 1.0), ar1_cov(4, 0.6, 1.0))),
}


def exact_conditional(cov: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gain = cov @ h.T @ torch.linalg.inv(h @ cov @ h.T)
    return gain @ y, cov - gain @ h @ cov


def guided_samples(task: str, kind: str, weight: float = WEIGHT):
    op, shape, cov = CASES[task]
    h = observation_matrix(op, shape)
    y = torch.linspace(0.9, 1.2, h.shape[0], dtype=F64)  # an observation far from the prior mean 0
    observed_shape = op.observed_shape(shape)
    guide = observation_guide(op, y.reshape(observed_shape).expand(N, *observed_shape[1:]), kind, weight)
    d = cov.shape[0]
    with torch.no_grad():
        x = sample(GaussianDenoiser(torch.zeros(d, dtype=F64), cov, "eps"), GaussianDiffusion("eps"),
                   (N, *shape[1:]), steps=STEPS, guide=guide, generator=torch.Generator().manual_seed(6), dtype=F64)
    return x.reshape(N, d), h, y, cov


@pytest.mark.parametrize("task", list(CASES))
def test_reconstruction_guidance_samples_the_exact_gaussian_conditional(task):
    x, h, y, cov = guided_samples(task, "reconstruction")
    mean, cond_cov = exact_conditional(cov, h, y)
    assert mean.abs().max() > 1.0  # the unguided mean (0) would fail the mean check by far
    err_mean = (x.mean(0) - mean).abs().max().item()
    assert err_mean < MEAN_TOL, f"{task}: guided mean off the exact conditional by {err_mean:.3f}"
    cov_ratio = ((torch.cov(x.T) - cond_cov).norm() / (cov - cond_cov).norm()).item()
    assert cov_ratio < COV_TOL, f"{task}: covariance error {cov_ratio:.2f} of the prior-to-conditional distance"
    torch.testing.assert_close(x @ h.T, y.expand(N, -1))  # the observed part is y exactly

    replaced, *_ = guided_samples(task, "replacement")
    err_replaced = (replaced.mean(0) - mean).abs().max().item()
    assert err_replaced > REPLACEMENT_FACTOR * err_mean, \
        f"{task}: replacement ({err_replaced:.3f}) not worse than reconstruction guidance ({err_mean:.3f})"
    torch.testing.assert_close(replaced @ h.T, y.expand(N, -1))


@pytest.mark.parametrize("task", list(CASES))
def test_lift_is_the_pseudo_inverse_and_noise_scale_the_observed_noise(task):
    """What replacement relies on: H⁺ = Hᵀ (H Hᵀ)⁻¹ and H Hᵀ = noise_scale² I."""
    op, shape, _ = CASES[task]
    h = observation_matrix(op, shape)
    torch.testing.assert_close(h @ h.T, op.noise_scale**2 * torch.eye(h.shape[0], dtype=F64))
    y = torch.randn(3, h.shape[0], dtype=F64, generator=torch.Generator().manual_seed(0))
    lifted = op.lift(y.reshape(3, *op.observed_shape(shape)[1:])).reshape(3, -1)
    torch.testing.assert_close(lifted, y @ torch.linalg.pinv(h).T)


def test_replacement_kind_per_operator_and_projection_equals_mask_replacement_for_frames():
    y = torch.randn(2, 1, 2, 4, 4, dtype=F64)
    frames = FrameSelection.every(2, 4)
    assert isinstance(replacement_for(frames, y), Replacement)
    assert isinstance(replacement_for(AveragePool(2), y[:, :, :, :2, :2]), ProjectionReplacement)
    # the projection formula on a frame selection is the mask formula: same result at the end ...
    x = torch.randn(2, 1, 4, 4, 4, dtype=F64)
    torch.testing.assert_close(ProjectionReplacement(y, frames).finalize(x), replacement_for(frames, y).finalize(x))
    # ... and at a noise level: unobserved frames untouched, observed ones drawn around α y
    z = ProjectionReplacement(y, frames).replace(x, torch.tensor(30.0, dtype=F64))
    torch.testing.assert_close(z[:, :, 1::2], x[:, :, 1::2])
    torch.testing.assert_close(z[:, :, 0::2], y, atol=1e-5, rtol=0)


def test_operators_reject_what_they_cannot_observe():
    with pytest.raises(ValueError, match="0 < k < window"):
        FrameSelection.first(8, 8)
    with pytest.raises(ValueError, match="interpolation factor"):
        FrameSelection.every(1, 8)
    with pytest.raises(ValueError, match="proper subset"):
        FrameSelection([0, 9], 8)
    with pytest.raises(ValueError, match=r"\[B, C, 8, H, W\]"):
        FrameSelection.first(2, 8).observe(torch.zeros(1, 1, 6, 2, 2))
    with pytest.raises(ValueError, match="divisible by 3"):
        AveragePool(3).observe(torch.zeros(1, 1, 2, 4, 4))
    with pytest.raises(ValueError, match="guidance="):
        observation_guide(AveragePool(2), torch.zeros(1, 1, 1, 2, 2), "inpaint")
    assert FrameSelection([0, 2, 3], 5).observe(torch.arange(5.0).reshape(1, 1, 5, 1, 1)).flatten().tolist() == [0, 2, 3]
