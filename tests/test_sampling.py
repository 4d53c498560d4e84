"""Samplers checked against the exact denoiser of Gaussian data.

For x ~ N(μ, Σ) the optimal network is closed form (testing.gaussian_denoiser), so any gap between the
samples and N(μ, Σ) is the sampler's own error: discretisation bias (shrinks with steps) plus Monte
Carlo error. Tolerances are k·(MC standard error) + a small bias allowance measured at these step
counts; the mutation tests show that plausible formula slips (a missing ½, a misplaced square root)
land far outside them. Data are [N, C=1, T, 1, 1] so Σ is over frames; all float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import model.sampling as sampling
from model.diffusion import GaussianDiffusion, alpha_sigma
from model.guidance import Guide, ReconstructionGuidance, Replacement, cfg_combine, frame_guide
from model.sampling import extend, langevin_step, sample
from testing.gaussian_denoiser import GaussianDenoiser

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def ar1_cov(t: int, rho: float, var: float) -> torch.Tensor:
    idx = torch.arange(t, dtype=F64)
    return var * rho ** (idx[:, None] - idx[None, :]).abs()


# correlated frames with unequal variances (one eigen-direction nearly flat)
T4 = 4
MU4 = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=F64)
COV4 = ar1_cov(T4, 0.9, 0.25) + torch.diag(torch.tensor([0.05, 0.1, 0.0, 0.2], dtype=F64))


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], -1)
    return flat.mean(0), torch.cov(flat.T)


def moment_errors(x, mu, cov):
    """max |Δmean| / tol and max |Δcov| / tol, with tol = 4 MC standard errors + a bias allowance."""
    n = x.shape[0]
    m, c = moments(x)
    se_mean = (cov.diagonal() / n).sqrt()
    se_cov = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / n).sqrt()
    mean_ratio = ((m - mu).abs() / (4 * se_mean + 0.005)).max().item()
    cov_ratio = ((c - cov).abs() / (4 * se_cov + 0.012)).max().item()
    return mean_ratio, cov_ratio


SAMPLER_CASES = [
    ("ancestral", 0.0),
    ("ancestral", 0.3),
    ("ancestral", 1.0),
    ("ddim", 0.0),
    ("pc", 0.3),
]


@pytest.mark.parametrize("prediction", ["eps", "v", "x"])
@pytest.mark.parametrize("sampler,gamma", SAMPLER_CASES)
def test_sampler_reproduces_gaussian_data(prediction, sampler, gamma):
    n = 16_000
    diffusion = GaussianDiffusion(prediction)
    den = GaussianDenoiser(MU4, COV4, prediction)
    with torch.no_grad():
        x = sample(den, diffusion, (n, 1, T4, 1, 1), steps=200, sampler=sampler, gamma=gamma,
                   generator=torch.Generator().manual_seed(1), dtype=F64)
    assert x.shape == (n, 1, T4, 1, 1) and x.dtype == F64
    mean_ratio, cov_ratio = moment_errors(x, MU4, COV4)
    assert mean_ratio < 1, f"mean off by {mean_ratio:.2f}x the tolerance"
    assert cov_ratio < 1, f"covariance off by {cov_ratio:.2f}x the tolerance"
    calls_per_step = 2 if sampler == "pc" else 1
    assert den.calls == 199 * calls_per_step + 1  # no corrector after the last step


def _no_half(z, e, s, d, n):
    return z - d * s * e + math.sqrt(d) * s * n


def _sqrt_over_sigma(z, e, s, d, n):
    return z - 0.5 * d * s * e + math.sqrt(d * s) * n


def _no_sqrt(z, e, s, d, n):
    return z - 0.5 * d * s * e + d * s * n


def _sigma_squared_drift(z, e, s, d, n):
    return z - 0.5 * d * s * s * e + math.sqrt(d) * s * n


CORRECTOR_MUTANTS = {
    "eq5": langevin_step,
    "no_half": _no_half,
    "sqrt_over_sigma": _sqrt_over_sigma,
    "no_sqrt": _no_sqrt,
    "sigma_squared_drift": _sigma_squared_drift,
}


@pytest.mark.parametrize("name", list(CORRECTOR_MUTANTS))
def test_pc_sampler_detects_corrector_formula_slips(monkeypatch, name):
    """The moment check above passes for eq. 5 and fails for each slip, at the same settings."""
    monkeypatch.setattr(sampling, "langevin_step", CORRECTOR_MUTANTS[name])
    n = 8_000
    diffusion = GaussianDiffusion("eps")
    with torch.no_grad():
        x = sample(GaussianDenoiser(MU4, COV4, "eps"), diffusion, (n, 1, T4, 1, 1), steps=100, sampler="pc",
                   generator=torch.Generator().manual_seed(2), dtype=F64)
    _, cov_ratio = moment_errors(x, MU4, COV4)
    if name == "eq5":
        assert cov_ratio < 1
    else:
        assert cov_ratio > 2, f"mutant {name} not detected (ratio {cov_ratio:.2f})"


def _ula_stationary_cov(lam: float, delta: float) -> torch.Tensor:
    """Unadjusted Langevin with step η on N(0, V) converges to per-eigenvalue v / (1 - η / (4 v))."""
    a, s = alpha_sigma(torch.tensor(lam, dtype=F64))
    evals, evecs = torch.linalg.eigh(a**2 * COV4 + s**2 * torch.eye(T4, dtype=F64))
    eta = delta * s**2
    return evecs @ torch.diag(evals / (1 - eta / (4 * evals))) @ evecs.T


@pytest.mark.parametrize("name", list(CORRECTOR_MUTANTS))
def test_langevin_corrector_keeps_noisy_marginal_stationary(name):
    """Iterating the corrector alone at fixed λ samples q(z_λ) = N(α μ, α² Σ + σ² I) (up to ULA's O(δ) bias)."""
    step = CORRECTOR_MUTANTS[name]
    lam, delta, n = 0.5, 0.1, 10_000
    den = GaussianDenoiser(MU4, COV4, "eps")
    a, s = alpha_sigma(torch.tensor(lam, dtype=F64))
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, 1, T4, 1, 1, generator=g, dtype=F64)  # start away from the target
    lam_b = torch.full((n,), lam, dtype=F64)
    for _ in range(300):
        z = step(z, den(z, lam_b), s.item(), delta, torch.randn(z.shape, generator=g, dtype=F64))
    target_cov = _ula_stationary_cov(lam, delta)
    mean_ratio, cov_ratio = moment_errors(z, a * MU4, target_cov)
    if name == "eq5":
        assert mean_ratio < 1 and cov_ratio < 1
        # and the ULA bias itself is small: within 3% of the exact marginal's covariance
        exact = a**2 * COV4 + s**2 * torch.eye(T4, dtype=F64)
        assert (target_cov - exact).abs().max() < 0.03 * exact.abs().max()
    else:
        assert cov_ratio > 2, f"mutant {name} not detected (ratio {cov_ratio:.2f})"


@pytest.mark.parametrize("prediction", ["eps", "v", "x"])
@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
@pytest.mark.parametrize("w", [1.0, 3.0])
def test_classifier_free_guidance_shifts_mean_exactly(prediction, sampler, w):
    """Same-variance Gaussians: (1+w) ε̂_c - w ε̂_u is the ε̂ of N((1+w) μ_c - w μ_u, s² I)."""
    n, s2 = 8_000, 0.2
    mu_c = torch.tensor([0.5, -0.25, 0.0, 0.25], dtype=F64)
    mu_u = torch.tensor([0.1, 0.1, -0.2, 0.3], dtype=F64)
    cov = s2 * torch.eye(T4, dtype=F64)
    den = GaussianDenoiser(mu_u, cov, prediction)
    with torch.no_grad():
        x = sample(den, GaussianDiffusion(prediction), (n, 1, T4, 1, 1), steps=100, sampler=sampler,
                   guidance_weight=w, cond={"mean": mu_c}, uncond={}, generator=torch.Generator().manual_seed(4),
                   dtype=F64)
    target = (1 + w) * mu_c - w * mu_u
    mean_ratio, cov_ratio = moment_errors(x, target, cov)
    assert mean_ratio < 1 and cov_ratio < 1
    # both branches every step, in two calls: uncond={} (the denoiser's own μ_u) cannot be merged with
    # cond's "mean" into one batch (tests/test_cfg_batched.py covers the batched path)
    assert den.calls == 2 * 100
    # without guidance the conditional branch alone gives μ_c
    with torch.no_grad():
        x0 = sample(den, GaussianDiffusion(prediction), (n, 1, T4, 1, 1), steps=50, cond={"mean": mu_c},
                    generator=torch.Generator().manual_seed(4), dtype=F64)
    assert moment_errors(x0, mu_c, cov)[0] < 1.5


def test_cfg_combination_is_parameterisation_invariant():
    g = torch.Generator().manual_seed(5)
    d = GaussianDiffusion("x")
    z = torch.randn(3, 1, 2, 1, 1, generator=g, dtype=F64)
    lam = torch.tensor([-3.0, 0.0, 2.0], dtype=F64)
    xc, xu = torch.randn(z.shape, generator=g, dtype=F64), torch.randn(z.shape, generator=g, dtype=F64)
    via_eps = cfg_combine(d.to_eps(xc, z, lam), d.to_eps(xu, z, lam), 2.5)
    torch.testing.assert_close(d.to_eps(cfg_combine(xc, xu, 2.5), z, lam), via_eps)


# --------------------------------------------------------------------------------------------------
# Reconstruction guidance vs replacement
# --------------------------------------------------------------------------------------------------
T8, K = 8, 4
COV8 = ar1_cov(T8, 0.95, 0.3)
X_A = torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=F64)


def _exact_conditional_mean():
    return COV8[K:, :K] @ torch.linalg.solve(COV8[:K, :K], X_A)  # μ = 0


def _extension_samples(kind, weight, sampler, n=2_000):
    context = X_A.reshape(1, 1, K, 1, 1).expand(n, 1, K, 1, 1)
    guide = frame_guide(context, T8, kind, weight)
    with torch.no_grad():
        x = sample(GaussianDenoiser(torch.zeros(T8, dtype=F64), COV8, "eps"), GaussianDiffusion("eps"),
                   (n, 1, T8, 1, 1), steps=100, sampler=sampler, guide=guide,
                   generator=torch.Generator().manual_seed(6), dtype=F64)
    return x.reshape(n, T8)


@pytest.mark.parametrize("sampler,weight,tol", [("ancestral", 4.0, 0.06), ("ddim", 5.0, 0.1)])
def test_reconstruction_guidance_matches_conditional_mean_better_than_replacement(sampler, weight, tol):
    """Exact E[x_b | x_a] = Σ_ba Σ_aa⁻¹ x_a ≈ (1.14, 1.08, 1.03, 0.98). A constant w_r is an approximation
    (the ideal weight grows with the noise level), so the tolerance is ~5-10% of the conditional shift;
    replacement misses by 0.3-0.6 because its x̂_b only sees the noisy z_a."""
    exact = _exact_conditional_mean()
    guided = _extension_samples("reconstruction", weight, sampler)
    replaced = _extension_samples("replacement", 0.0, sampler)
    err_guided = (guided[:, K:].mean(0) - exact).abs().max().item()
    err_replaced = (replaced[:, K:].mean(0) - exact).abs().max().item()
    assert err_guided < tol, f"reconstruction guidance off the conditional mean by {err_guided:.3f}"
    assert err_replaced > 4 * err_guided and err_replaced > 0.25
    # observed frames come back exactly
    torch.testing.assert_close(guided[:, :K], X_A.expand(guided.shape[0], K))
    # and guidance also narrows the spread towards the conditional one (prior var 0.3)
    cond_var = (COV8[K:, K:] - COV8[K:, :K] @ torch.linalg.solve(COV8[:K, :K], COV8[:K, K:])).diagonal()
    assert (guided[:, K:].var(0) < 0.3).all() and (guided[:, K:].var(0) > 0.25 * cond_var).all()


def test_reconstruction_guidance_super_resolution_mean_pooling():
    """Eq. 8: observe = 2x temporal mean-pooling; guided samples hit E[x | Hx = y] and are consistent with y."""
    t, n = 4, 2_000
    cov = ar1_cov(t, 0.8, 0.3)
    h = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], dtype=F64)
    y = torch.tensor([0.8, -0.3], dtype=F64)
    exact = cov @ h.T @ torch.linalg.solve(h @ cov @ h.T, y)

    def observe(x):
        return 0.5 * (x[:, :, 0::2] + x[:, :, 1::2])

    guide = ReconstructionGuidance(y.reshape(1, 1, 2, 1, 1).expand(n, 1, 2, 1, 1), observe, 4.0)
    with torch.no_grad():
        x = sample(GaussianDenoiser(torch.zeros(t, dtype=F64), cov, "v"), GaussianDiffusion("v"), (n, 1, t, 1, 1),
                   steps=100, guide=guide, generator=torch.Generator().manual_seed(7), dtype=F64)
    x = x.reshape(n, t)
    assert (x.mean(0) - exact).abs().max() < 0.05
    assert ((x @ h.T).mean(0) - y).abs().max() < 0.05
    assert exact.abs().max() > 0.4  # the unguided mean (0) would fail the first check


def test_guidance_with_module_under_no_grad_leaves_parameters_untouched():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, kernel_size=(3, 1, 1), padding=(1, 0, 0))

    def denoiser(z, logsnr):
        return net(z) + 0.0 * logsnr.reshape(-1, 1, 1, 1, 1)

    guide = frame_guide(torch.zeros(2, 1, 2, 1, 1), 4, "reconstruction", 2.0)
    with torch.no_grad():
        x = sample(denoiser, GaussianDiffusion("eps"), (2, 1, 4, 1, 1), steps=5, guide=guide, clip_x=True,
                   generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 4, 1, 1) and torch.isfinite(x).all() and not x.requires_grad
    assert all(p.grad is None for p in net.parameters())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        sample(denoiser, GaussianDiffusion("eps"), (2, 1, 4, 1, 1), steps=2, guide=guide)


def test_any_object_with_the_guide_hooks_guides_the_sampler():
    """`Guide` is a protocol, not a union of the two built-in classes: both satisfy it, and sample()
    drives a third, unrelated class through the same three hooks."""
    x_a = torch.zeros(2, 1, 4, 1, 1, dtype=F64)
    for kind in ("reconstruction", "replacement"):
        assert isinstance(frame_guide(x_a[:, :, :2], 4, kind), Guide)
    assert isinstance(Replacement(x_a, torch.ones(1, dtype=torch.bool)), Guide)
    assert not isinstance(object(), Guide)

    class Pin:  # pins frame 0 to 1.0 and counts the hook calls
        def __init__(self):
            self.calls = {"replace": 0, "predict_x": 0, "finalize": 0}

        def replace(self, z, logsnr, generator=None):
            self.calls["replace"] += 1
            return z

        def predict_x(self, predict, z, logsnr):
            self.calls["predict_x"] += 1
            return predict(z)

        def finalize(self, x):
            self.calls["finalize"] += 1
            return torch.cat([torch.ones_like(x[:, :, :1]), x[:, :, 1:]], dim=2)

    pin = Pin()
    assert isinstance(pin, Guide)
    den = GaussianDenoiser(MU4, COV4, "eps")
    x = sample(den, GaussianDiffusion("eps"), (3, 1, T4, 1, 1), steps=4, guide=pin,
               generator=torch.Generator().manual_seed(0))
    assert (x[:, :, 0] == 1.0).all()
    assert pin.calls["predict_x"] == 4 and pin.calls["finalize"] == 1 and pin.calls["replace"] >= 4


# --------------------------------------------------------------------------------------------------
# extend(): long videos from overlapping windows
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", ["reconstruction", "replacement"])
def test_extend_builds_long_video_that_continues_across_windows(guidance):
    rho, n, window = 0.95, 1_000, 4
    cov = ar1_cov(window, rho, 0.3)  # stationary AR(1): every window has the same law
    den = GaussianDenoiser(torch.zeros(window, dtype=F64), cov, "eps")
    with torch.no_grad():
        video = extend(den, GaussianDiffusion("eps"), (n, 1, window, 1, 1), 10, context_frames=2,
                       guidance=guidance, reconstruction_weight=4.0, steps=50, generator=torch.Generator().manual_seed(8),
                       dtype=F64)
    assert video.shape == (n, 1, 10, 1, 1)
    frames = video.reshape(n, 10)
    corr = torch.corrcoef(frames.T)
    # window boundaries at frames 4|5... (first window 0-3, then 4-5, 6-7, 8-9): across each boundary the
    # correlation of neighbours stays near ρ; independent windows would give ~0
    floor = 0.8 if guidance == "reconstruction" else 0.5  # replacement is biased but still continues
    for last in (3, 5, 7):
        assert corr[last, last + 1] > floor, f"frames {last}->{last + 1} correlation {corr[last, last + 1]:.2f}"
    if guidance == "reconstruction":
        # frames 2 apart straddling a boundary still carry ρ² correlation
        assert corr[3, 5] > 0.7
        assert (frames.var(0) - 0.3).abs().max() < 0.12


def test_extend_window_accounting_and_errors():
    calls = []

    def den(z, logsnr):
        calls.append(z.shape)
        return torch.zeros_like(z)

    with torch.no_grad():
        v = extend(den, GaussianDiffusion("eps"), (1, 1, 4, 1, 1), 9, context_frames=2, steps=2,
                   generator=torch.Generator().manual_seed(0))
    assert v.shape == (1, 1, 9, 1, 1)
    assert len(calls) == 2 * 4  # 4 windows (4 + 2 + 2 + 1 new frames), 2 steps each, all full windows
    assert all(s == (1, 1, 4, 1, 1) for s in calls)
    with torch.no_grad():
        assert extend(den, GaussianDiffusion("eps"), (1, 1, 4, 1, 1), 3, steps=1).shape == (1, 1, 3, 1, 1)
        calls.clear()
        # the paper's 16 -> 64 frames with half-window context: 1 free window + 6 conditioned ones
        long = extend(den, GaussianDiffusion("eps"), (1, 1, 16, 1, 1), 64, steps=1, guidance="replacement")
    assert long.shape == (1, 1, 64, 1, 1) and len(calls) == 7
    with pytest.raises(ValueError, match="context_frames"):
        extend(den, GaussianDiffusion("eps"), (1, 1, 4, 1, 1), 8, context_frames=4)
    with pytest.raises(ValueError, match="guidance="):
        extend(den, GaussianDiffusion("eps"), (1, 1, 4, 1, 1), 8, guidance="inpaint", steps=1)


# --------------------------------------------------------------------------------------------------
# Robustness: dtypes, clipping, argument errors, determinism
# --------------------------------------------------------------------------------------------------
def test_bf16_denoiser_fp32_state_clip_and_determinism():
    den64 = GaussianDenoiser(MU4 * 4, COV4, "v")  # mean outside [-1, 1] for one frame

    def den_bf16(z, logsnr, **kw):
        return den64(z.double(), logsnr.double(), **kw).to(torch.bfloat16)

    d = GaussianDiffusion("v")
    with torch.no_grad():
        a = sample(den_bf16, d, (64, 1, T4, 1, 1), steps=20, generator=torch.Generator().manual_seed(9))
        b = sample(den_bf16, d, (64, 1, T4, 1, 1), steps=20, generator=torch.Generator().manual_seed(9))
        c = sample(den_bf16, d, (64, 1, T4, 1, 1), steps=20, clip_x=True, sampler="pc",
                   generator=torch.Generator().manual_seed(9))
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert a.abs().max() > 1.0 and c.abs().max() <= 1.0


def test_replacement_keeps_observed_values_and_validates_mask():
    x_a = torch.zeros(2, 1, 4, 1, 1)
    x_a[:, :, 0] = 0.5
    mask = torch.tensor([True, False, False, False]).reshape(1, 1, 4, 1, 1)
    rep = Replacement(x_a, mask)
    z = rep.replace(torch.full((2, 1, 4, 1, 1), 9.0), torch.tensor(20.0))
    assert torch.allclose(z[:, :, 0], torch.full_like(z[:, :, 0], 0.5), atol=1e-3)
    assert (z[:, :, 1:] == 9.0).all()
    with pytest.raises(ValueError, match="does not broadcast"):
        Replacement(x_a, torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"sampler": "euler"}, "sampler="), ({"steps": 0}, "steps"), ({"gamma": 1.5}, "gamma"),
     ({"langevin_delta": -1.0}, "langevin_delta")],
)
def test_sample_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(lambda z, lam: z, GaussianDiffusion("eps"), (1, 1, 2, 1, 1), **kwargs)


def test_sample_names_a_denoiser_with_the_wrong_output_shape():
    with pytest.raises(ValueError, match=r"denoiser returned shape \(1, 1, 1, 1, 1\)"):
        sample(lambda z, lam: z[:, :, :1], GaussianDiffusion("eps"), (1, 1, 2, 1, 1), steps=2)


def test_real_unet_cfg_extend_with_reconstruction_guidance():
    """The contract with SpaceTimeUNet: text kwargs as cond, None text as the CFG null branch, gradients
    through the network for reconstruction guidance, windows of the model's frame count."""
    from model.config import UNetConfig
    from model.unet import SpaceTimeUNet

    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=3, out_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                     image_size=8, attention_resolutions=(4,), head_dim=8, cond_dim=16, text_dim=12, groups=4)
    net = SpaceTimeUNet(cfg).eval()
    cond = {"text_emb": torch.randn(2, 3, 12), "text_mask": torch.tensor([[True, True, False], [True, False, False]])}
    uncond = {"text_emb": None, "text_mask": None}
    kw = dict(steps=2, guidance_weight=2.0, cond=cond, uncond=uncond, clip_x=True)
    with torch.no_grad():
        a = extend(net, GaussianDiffusion("v"), (2, 3, 4, 8, 8), 6, context_frames=2,
                   generator=torch.Generator().manual_seed(1), **kw)
        b = extend(net, GaussianDiffusion("v"), (2, 3, 4, 8, 8), 6, context_frames=2,
                   generator=torch.Generator().manual_seed(1), **kw)
        c = sample(net, GaussianDiffusion("v"), (2, 3, 4, 8, 8), sampler="pc",
                   generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (2, 3, 6, 8, 8) and torch.isfinite(a).all() and a.abs().max() <= 1.0
    assert torch.equal(a, b)
    assert c.shape == (2, 3, 4, 8, 8) and torch.isfinite(c).all()
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("prediction", ["eps", "v", "x"])
def test_float32_state_is_accurate_at_both_ends_of_the_schedule(prediction):
    """fp32 sampling (the default) divides by α ≈ 5e-5 at λ = -20 (eps) and by σ at λ = +20 (x):
    the coefficients are formed in float64, so the fp32 samples still have the data's moments."""
    n = 8_000
    den = GaussianDenoiser(MU4, COV4, prediction)
    with torch.no_grad():
        x = sample(den, GaussianDiffusion(prediction), (n, 1, T4, 1, 1), steps=100, gamma=1.0,
                   generator=torch.Generator().manual_seed(10))
    assert x.dtype == torch.float32
    mean_ratio, cov_ratio = moment_errors(x.double(), MU4, COV4)
    assert mean_ratio < 1 and cov_ratio < 1


def test_reconstruction_guidance_correction_matches_closed_form():
    """For Gaussian data x̂ = μ + A(z − αμ) with A = αΣM⁻¹, M = α²Σ + σ²I, so eq. 7/8 gives
    x̃ − x̂ = w_r α Aᵀ Hᵀ (x_a − H x̂) = w_r (α²/σ²) P Hᵀ (x_a − H x̂), P = Cov(x | z) = σ² Σ M⁻¹."""
    g = torch.Generator().manual_seed(11)
    lam, w = torch.tensor(0.7, dtype=F64), 3.0
    a, s = alpha_sigma(lam)
    h = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0]], dtype=F64)  # first frame + a pooled pair
    x_a = torch.randn(5, 2, generator=g, dtype=F64)
    z = torch.randn(5, 1, T4, 1, 1, generator=g, dtype=F64)
    den = GaussianDenoiser(MU4, COV4, "x")
    guide = ReconstructionGuidance(x_a.reshape(5, 1, 2, 1, 1), lambda x: (x.reshape(-1, T4) @ h.T).reshape(-1, 1, 2, 1, 1), w)
    lam_b = lam.expand(5)
    with torch.no_grad():
        x_tilde = guide.predict_x(lambda zz: den(zz, lam_b), z, lam).reshape(5, T4)
    x_hat = den(z, lam_b).reshape(5, T4)
    p = s**2 * COV4 @ torch.linalg.inv(a**2 * COV4 + s**2 * torch.eye(T4, dtype=F64))
    expected = x_hat + w * a**2 / s**2 * (x_a - x_hat @ h.T) @ h @ p.T
    torch.testing.assert_close(x_tilde, expected, rtol=1e-9, atol=1e-12)
