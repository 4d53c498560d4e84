"""Closed-form checks of the diffusion math: schedule, parameterisations, forward/posterior Gaussians,
loss weightings. float64 where the identity is exact, so tolerances are rounding-level."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import DiffusionConfig
from model.diffusion import (
    GaussianDiffusion,
    alpha_sigma,
    ancestral_variance,
    convert,
    cosine_logsnr,
    cosine_logsnr_inverse,
    error_scale,
    posterior,
    q_mean_std,
    transition,
    v_from_x_eps,
)

F64 = torch.float64


def test_alpha_sigma_unit_norm_and_snr():
    lam = torch.linspace(-20, 20, 101, dtype=F64)
    a, s = alpha_sigma(lam)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(lam), rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.log(a**2 / s**2), lam, rtol=0, atol=1e-9)
    assert (a > 0).all() and (s > 0).all()  # no underflow at the ends


def test_cosine_schedule_endpoints_monotone_and_inverse():
    t = torch.linspace(0, 1, 1001, dtype=F64)
    lam = cosine_logsnr(t)
    assert lam[0].item() == pytest.approx(20.0, abs=1e-9)
    assert lam[-1].item() == pytest.approx(-20.0, abs=1e-9)
    assert (lam[1:] < lam[:-1]).all(), "λ(t) must be strictly decreasing"
    lam2 = cosine_logsnr(t, -5.0, 7.0)
    assert lam2[0].item() == pytest.approx(7.0, abs=1e-9) and lam2[-1].item() == pytest.approx(-5.0, abs=1e-9)
    torch.testing.assert_close(cosine_logsnr_inverse(lam), t, rtol=0, atol=1e-9)
    # between the clips it is the cosine schedule: α_t = cos(π t / 2) exactly at t = 1/2 (λ = 0)
    assert cosine_logsnr(torch.tensor(0.5, dtype=F64)).item() == pytest.approx(0.0, abs=1e-6)
    a, _ = alpha_sigma(cosine_logsnr(torch.tensor([0.25], dtype=F64)))
    assert a.item() == pytest.approx(math.cos(math.pi / 8), abs=2e-4)
    # float32 input keeps its dtype and stays finite at the ends
    lam32 = cosine_logsnr(torch.tensor([0.0, 1.0]))
    assert lam32.dtype == torch.float32 and torch.isfinite(lam32).all()
    with pytest.raises(ValueError, match="logsnr_min"):
        cosine_logsnr(0.5, 3.0, 1.0)


def test_q_sample_moments_monte_carlo():
    diff = GaussianDiffusion("eps")
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x = torch.full((n, 1, 2, 1, 1), 0.7, dtype=F64)
    x[:, :, 1] = -0.4
    lam = torch.full((n,), 1.3, dtype=F64)
    z = diff.q_sample(x, lam, torch.randn(x.shape, generator=g, dtype=F64))
    a, s = alpha_sigma(torch.tensor(1.3, dtype=F64))
    se_mean, se_var = s / math.sqrt(n), s**2 * math.sqrt(2 / n)
    for f, xv in ((0, 0.7), (1, -0.4)):
        zf = z[:, 0, f].flatten()
        assert abs(zf.mean() - a * xv) < 5 * se_mean
        assert abs(zf.var() - s**2) < 5 * se_var
    # per-sample logsnr broadcasts over the non-batch dims
    m, sd = q_mean_std(x[:2], torch.tensor([0.0, 5.0], dtype=F64))
    assert sd.shape == (2, 1, 1, 1, 1)
    torch.testing.assert_close(m[1], alpha_sigma(torch.tensor(5.0, dtype=F64))[0] * x[1])


@pytest.mark.parametrize("lam", [-20.0, -3.0, 0.0, 4.0, 20.0])
def test_parameterisations_round_trip(lam):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 2, 2, generator=g, dtype=F64)
    eps = torch.randn(x.shape, generator=g, dtype=F64)
    a, s = alpha_sigma(torch.tensor(lam, dtype=F64))
    z = a * x + s * eps
    v = v_from_x_eps(x, eps, a, s)
    truth = {"x": x, "eps": eps, "v": v}
    # exact values at the extremes are recovered only where the inverse is well conditioned
    tol = 1e-8 if abs(lam) < 10 else 1e-3
    for src in truth:
        for dst in truth:
            if (lam == 20.0 and src == "x" and dst != "x") or (lam == -20.0 and src == "eps" and dst != "eps"):
                continue  # ε from x divides by σ ≈ 5e-5 (and x from ε by α): information is lost there
            got = convert(truth[src], z, a, s, src, dst)
            torch.testing.assert_close(got, truth[dst], rtol=0, atol=tol, msg=f"{src}->{dst} at λ={lam}")
    # v = α ε - σ x is the definition; z and v rotate (x, ε) by the same angle
    torch.testing.assert_close(x, a * z - s * v)
    torch.testing.assert_close(eps, s * z + a * v)
    with pytest.raises(ValueError, match="unknown parameterisation"):
        convert(x, z, a, s, "score", "x")


def test_diffusion_to_x_to_eps_to_v_match_functions():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 3, 2, 2, generator=g, dtype=F64)
    eps = torch.randn(x.shape, generator=g, dtype=F64)
    lam = torch.tensor([-4.0, -1.0, 2.0, 6.0], dtype=F64)
    for pred in ("eps", "v", "x"):
        d = GaussianDiffusion(pred)
        a, s = alpha_sigma(lam)
        a, s = a.reshape(-1, 1, 1, 1, 1), s.reshape(-1, 1, 1, 1, 1)
        z = a * x + s * eps
        native = {"eps": eps, "x": x, "v": v_from_x_eps(x, eps, a, s)}[pred]
        torch.testing.assert_close(d.to_x(native, z, lam), x)
        torch.testing.assert_close(d.to_eps(native, z, lam), eps)
        torch.testing.assert_close(d.to_v(native, z, lam), v_from_x_eps(x, eps, a, s))
        torch.testing.assert_close(d.from_x(x, z, lam), native)
        # bf16 model output converts in z's dtype
        assert d.to_x(native.to(torch.bfloat16), z.float(), lam.float()).dtype == torch.float32


def test_transition_composes_with_marginal():
    """q(z_t|z_s) ∘ q(z_s|x) = q(z_t|x): mean α_{t|s} α_s x = α_t x, var α_{t|s}² σ_s² + σ²_{t|s} = σ_t²."""
    lam_s = torch.tensor([10.0, 2.0, 0.5, -3.0, 1e-3], dtype=F64)
    lam_t = torch.tensor([-10.0, 1.0, 0.4999, -19.0, 0.0], dtype=F64)
    a_ts, var_ts = transition(lam_s, lam_t)
    a_s, s_s = alpha_sigma(lam_s)
    a_t, s_t = alpha_sigma(lam_t)
    torch.testing.assert_close(a_ts * a_s, a_t, rtol=1e-12, atol=0)
    torch.testing.assert_close(a_ts**2 * s_s**2 + var_ts, s_t**2, rtol=1e-10, atol=0)
    assert (var_ts > 0).all()  # expm1: accurate even for λ_t ≈ λ_s

    # Monte Carlo: two-stage sampling has the one-stage moments
    g = torch.Generator().manual_seed(3)
    n = 200_000
    x = 0.8
    ls, lt = torch.tensor(1.5, dtype=F64), torch.tensor(-0.7, dtype=F64)
    (a1, s1), (a2, var2) = alpha_sigma(ls), transition(ls, lt)
    zs = a1 * x + s1 * torch.randn(n, generator=g, dtype=F64)
    zt = a2 * zs + var2.sqrt() * torch.randn(n, generator=g, dtype=F64)
    at, st = alpha_sigma(lt)
    assert abs(zt.mean() - at * x) < 5 * st / math.sqrt(n)
    assert abs(zt.var() - st**2) < 5 * st**2 * math.sqrt(2 / n)


def test_posterior_is_bayes_of_forward_process():
    """q(z_s|z_t,x) from eq. 3 equals the Gaussian conditioning of the joint (z_s, z_t) given x."""
    g = torch.Generator().manual_seed(4)
    for ls, lt in ((3.0, -1.0), (0.2, 0.1), (20.0, 8.0), (-5.0, -20.0)):
        ls_, lt_ = torch.tensor(ls, dtype=F64), torch.tensor(lt, dtype=F64)
        x = torch.randn(5, 1, 2, 1, 1, generator=g, dtype=F64)
        z_t = torch.randn(x.shape, generator=g, dtype=F64)
        mean, var = posterior(z_t, x, lt_, ls_)
        a_s, s_s = alpha_sigma(ls_)
        a_t, s_t = alpha_sigma(lt_)
        a_ts, _ = transition(ls_, lt_)
        cov_st = a_ts * s_s**2  # Cov(z_s, z_t | x)
        bayes_mean = a_s * x + cov_st / s_t**2 * (z_t - a_t * x)
        bayes_var = s_s**2 - cov_st**2 / s_t**2
        torch.testing.assert_close(mean, bayes_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var.expand_as(z_t), bayes_var.expand_as(z_t), rtol=1e-9, atol=1e-14)


def test_ancestral_variance_interpolates_log_domain():
    ls, lt = torch.tensor(2.0, dtype=F64), torch.tensor(-1.0, dtype=F64)
    _, post_var = posterior(torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), lt, ls)
    _, trans_var = transition(ls, lt)
    torch.testing.assert_close(ancestral_variance(lt, ls, 0.0), post_var.squeeze())
    torch.testing.assert_close(ancestral_variance(lt, ls, 1.0), trans_var)
    mid = ancestral_variance(lt, ls, 0.3)
    torch.testing.assert_close(mid, post_var.squeeze() ** 0.7 * trans_var**0.3)
    assert post_var.squeeze() < mid < trans_var  # σ̃² ≤ σ²_{t|s} since σ_s < σ_t


class _FixedPrediction:
    """A denoiser that returns a fixed x̂ in the requested parameterisation (same x̂ for every diffusion)."""

    def __init__(self, x_hat, prediction, dtype=None):
        self.x_hat, self.prediction, self.dtype = x_hat, prediction, dtype

    def __call__(self, z, logsnr):
        a, s = alpha_sigma(logsnr.to(F64))
        a, s = a.reshape(-1, 1, 1, 1, 1).to(z.dtype), s.reshape(-1, 1, 1, 1, 1).to(z.dtype)
        out = convert(self.x_hat.to(z.dtype), z, a, s, "x", self.prediction)
        return out if self.dtype is None else out.to(self.dtype)


def test_loss_weightings_relations():
    """Same x̂, three weightings: v_mse = (1+SNR) x_mse and eps_mse = SNR x_mse, for every parameterisation."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, 3, 2, 2, generator=g, dtype=F64)
    x_hat = x + 0.1 * torch.randn(x.shape, generator=g, dtype=F64)
    noise = torch.randn(x.shape, generator=g, dtype=F64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.5, 0.7, 0.9], dtype=F64)
    for pred in ("eps", "v", "x"):
        losses = {}
        for w in ("x_mse", "eps_mse", "v_mse"):
            d = GaussianDiffusion(pred, loss_weighting=w)
            per, lam = d.loss_terms(_FixedPrediction(x_hat, pred), x, t=t, noise=noise)
            assert per.shape == (6,) and per.dtype == torch.float32
            losses[w] = per.double()
        snr = torch.exp(lam.double())
        expected_x = (x - x_hat).square().flatten(1).mean(1)
        torch.testing.assert_close(losses["x_mse"], expected_x, rtol=1e-5, atol=0)
        torch.testing.assert_close(losses["v_mse"], (1 + snr) * losses["x_mse"], rtol=1e-5, atol=0)
        torch.testing.assert_close(losses["eps_mse"], snr * losses["x_mse"], rtol=1e-5, atol=0)


def test_loss_terms_native_error_matches_conversion_and_bf16_output():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 1, 2, 2, 2, generator=g)
    x_hat = x + 0.05 * torch.randn(x.shape, generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([0.1, 0.3, 0.6, 0.8])
    d = GaussianDiffusion("v", loss_weighting="eps_mse")
    per, lam = d.loss_terms(_FixedPrediction(x_hat, "v"), x, t=t, noise=noise)
    a, s = alpha_sigma(lam.double())
    a, s = a.reshape(-1, 1, 1, 1, 1), s.reshape(-1, 1, 1, 1, 1)
    z = a * x.double() + s * noise.double()
    eps_hat = convert(x_hat.double(), z, a, s, "x", "eps")
    torch.testing.assert_close(per.double(), (eps_hat - noise.double()).square().flatten(1).mean(1), rtol=1e-4, atol=1e-6)
    # a bf16 network still gets an fp32 loss, close to the fp32 one
    per16, _ = d.loss_terms(_FixedPrediction(x_hat, "v", torch.bfloat16), x, t=t, noise=noise)
    assert per16.dtype == torch.float32
    torch.testing.assert_close(per16, per, rtol=0.1, atol=1e-3)
    # scalar loss samples t from the global RNG; reproducible under a seed
    torch.manual_seed(0)
    l1 = d.loss(_FixedPrediction(x_hat, "v"), x)
    torch.manual_seed(0)
    l2 = d.loss(_FixedPrediction(x_hat, "v"), x)
    assert l1.ndim == 0 and torch.isfinite(l1) and l1.item() == l2.item()


def test_error_scale_matches_conversions():
    a, s = alpha_sigma(torch.tensor(0.8, dtype=F64))
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, generator=g, dtype=F64)
    p1, p2 = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    for src in ("eps", "v", "x"):
        for dst in ("eps", "v", "x"):
            d_dst = convert(p1, z, a, s, src, dst) - convert(p2, z, a, s, src, dst)
            torch.testing.assert_close(d_dst, error_scale(src, dst, a, s) * (p1 - p2))


def test_from_config_and_bad_names():
    d = GaussianDiffusion.from_config(DiffusionConfig(prediction="v", logsnr_min=-15, logsnr_max=15, loss_weighting="v_mse"))
    assert (d.prediction, d.logsnr_min, d.logsnr_max, d.loss_weighting) == ("v", -15.0, 15.0, "v_mse")
    assert d.logsnr(torch.tensor(0.0)).item() == pytest.approx(15.0, abs=1e-4)
    with pytest.raises(ValueError, match="prediction='score'"):
        GaussianDiffusion("score")
    with pytest.raises(TypeError, match="prediction"):  # no default: an eps checkpoint must not be read as v
        GaussianDiffusion()
    with pytest.raises(ValueError, match="loss_weighting='l1'"):
        GaussianDiffusion("eps", loss_weighting="l1")
    with pytest.raises(ValueError, match="expected"):
        GaussianDiffusion("eps").loss_terms(lambda z, lam: z[:, :, :1], torch.zeros(2, 1, 2, 1, 1))
