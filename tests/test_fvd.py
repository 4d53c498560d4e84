"""FVD: the Fréchet distance against closed forms (float64), running feature statistics against numpy,
a scripted stand-in detector with the I3D TorchScript call signature, and the detector download
against a real HTTP server on 127.0.0.1. No network beyond loopback."""

from __future__ import annotations

import hashlib
import http.server
import math
import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

from trainer.fvd import (
    DETECTOR_KWARGS,
    DetectorDownloadError,
    FeatureStats,
    I3DFeatureExtractor,
    frechet_distance,
    fvd_from_stats,
    resolve_detector,
    to_detector_uint8,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _random_cov(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0.0 if rank else 0.1) * np.eye(d)


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# --------------------------------------------------------------------------------------------------
# frechet_distance
# --------------------------------------------------------------------------------------------------
def test_identical_gaussians_give_zero():
    rng = _rng(0)
    mu, sigma = rng.standard_normal(32), _random_cov(rng, 32)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_covariances_closed_form():
    rng = _rng(1)
    d = 20
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    s2[:3] = 0.0  # zero-variance dimensions are allowed
    expected = np.sum((m1 - m2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_commuting_full_covariances_closed_form():
    """Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ share an eigenbasis: tr((Σ1Σ2)^½) = Σ sqrt(a b)."""
    rng = _rng(2)
    d = 24
    q = _orthogonal(rng, d)
    a, b = rng.uniform(0.05, 4.0, d), rng.uniform(0.05, 4.0, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((m1 - m2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-10)


def test_non_commuting_2x2_closed_form():
    """For 2x2, tr(√M) = sqrt(tr M + 2 sqrt(det M)) (√λ1 + √λ2 squared), M = Σ1Σ2 not symmetric."""
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
    m = s1 @ s2
    assert not np.allclose(m, m.T)
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 2.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_symmetric_in_its_arguments_and_accepts_torch():
    rng = _rng(3)
    d = 16
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    f12, f21 = frechet_distance(m1, s1, m2, s2), frechet_distance(m2, s2, m1, s1)
    assert f12 > 0
    assert f12 == pytest.approx(f21, rel=1e-10)
    as_torch = [torch.from_numpy(x) for x in (m1, s1, m2, s2)]
    assert frechet_distance(*as_torch) == pytest.approx(f12, rel=1e-12)


def test_matches_scipy_sqrtm_formula_on_full_rank():
    """The formula the common implementations use (scipy.linalg.sqrtm of Σ1Σ2), where it is well-posed."""
    linalg = pytest.importorskip("scipy.linalg")
    rng = _rng(4)
    d = 40
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    root = linalg.sqrtm(s1 @ s2)
    expected = np.real(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * root))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def test_rank_deficient_covariances_stay_real_and_exact():
    """Fewer clips than dimensions → singular Σ; identical singular Σ leave only the mean term."""
    rng = _rng(5)
    d = 30
    sigma = _random_cov(rng, d, rank=4)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    fd = frechet_distance(m1, sigma, m2, sigma)
    assert np.isfinite(fd)
    assert fd == pytest.approx(np.sum((m1 - m2) ** 2), abs=1e-9)


def test_float64_where_float32_would_lose_the_answer():
    """Means of 1e8 differing by 0.5 and variances of 1e8: exact answer 0.25 per dimension. In float32
    1e8 + 0.5 rounds to 1e8 (spacing 8) and the trace term alone carries errors of order 10."""
    d = 8
    mu1 = np.full(d, 1e8)
    mu2 = mu1 + 0.5
    assert np.float32(mu2[0]) == np.float32(mu1[0])  # float32 cannot tell the means apart
    sigma = 1e8 * np.eye(d) + np.diag(np.arange(d, dtype=np.float64))
    expected = 0.25 * d
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-6)
    as_torch = [torch.from_numpy(x) for x in (mu1, sigma, mu2, sigma)]
    assert frechet_distance(*as_torch) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_validates_shapes_and_values():
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(3), np.eye(3), np.array([0.0, np.nan, 0.0]), np.eye(3))


# --------------------------------------------------------------------------------------------------
# FeatureStats
# --------------------------------------------------------------------------------------------------
def _batches(rng: np.random.Generator, sizes, d: int, offset: float = 0.0):
    mix = rng.standard_normal((d, d))
    return [offset + rng.standard_normal((n, d)) @ mix for n in sizes]


@pytest.mark.parametrize("ddof", [1, 0])
def test_feature_stats_equals_numpy_over_the_concatenation(ddof):
    rng = _rng(6)
    batches = _batches(rng, [7, 1, 0, 13, 5], d=10, offset=1e4)  # large mean: raw sums would cancel
    stats = FeatureStats(ddof=ddof)
    for i, b in enumerate(batches):
        stats.update(torch.from_numpy(b).float() if i == 3 else b)  # torch float32 batches too
    batches[3] = batches[3].astype(np.float32).astype(np.float64)
    allx = np.concatenate(batches)
    mean, cov = stats.mean_cov()
    assert stats.num == 26 and stats.dim == 10
    assert mean.dtype == np.float64 and cov.dtype == np.float64
    np.testing.assert_allclose(mean, allx.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(cov, np.cov(allx, rowvar=False, ddof=ddof), rtol=1e-9, atol=1e-9)
    assert np.array_equal(cov, cov.T)


def test_feature_stats_merge_equals_one_pass():
    rng = _rng(7)
    batches = _batches(rng, [9, 4, 11, 6], d=5)
    whole, left, right = FeatureStats(), FeatureStats(), FeatureStats()
    for b in batches:
        whole.update(b)
    for b in batches[:2]:
        left.update(b)
    for b in batches[2:]:
        right.update(b)
    left.merge(right)
    left.merge(FeatureStats())  # an empty one changes nothing
    for x, y in zip(left.mean_cov(), whole.mean_cov()):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


def test_feature_stats_errors():
    stats = FeatureStats()
    with pytest.raises(ValueError, match="at least 2 clips"):
        stats.mean_cov()
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2 clips.*got 1$"):
        stats.mean_cov()
    with pytest.raises(ValueError, match="at least 2 clips"):
        fvd_from_stats(stats, stats)
    with pytest.raises(ValueError, match="dimension"):
        stats.update(np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        stats.update(np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="ddof"):
        FeatureStats(ddof=2)
    a, b = FeatureStats(), FeatureStats()
    a.update(np.zeros((2, 3)))
    b.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="3 vs 4"):
        fvd_from_stats(a, b)


def test_fvd_from_stats_is_frechet_distance_of_the_fits():
    rng = _rng(8)
    xa, xb = _batches(rng, [50], d=6)[0], _batches(rng, [40], d=6, offset=0.5)[0]
    a, b = FeatureStats(), FeatureStats()
    a.update(xa)
    b.update(xb)
    expected = frechet_distance(xa.mean(0), np.cov(xa, rowvar=False), xb.mean(0), np.cov(xb, rowvar=False))
    assert fvd_from_stats(a, b) == pytest.approx(expected, rel=1e-10)


# --------------------------------------------------------------------------------------------------
# The extractor, with a scripted stand-in for i3d_torchscript.pt
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def standin_file(standin_i3d_file):
    return standin_i3d_file


def _videos(n: int, seed: int, shift: float = 0.0, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(n, channels, 4, 12, 10, generator=g) + shift).clamp(-1, 1)


def test_to_detector_uint8_quantisation():
    v = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 7, 1, 1)
    out = to_detector_uint8(v)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 7, 1, 1)
    # round-half-up of x * 127.5 + 127.5, clamped: -0.5 → 63.75 → 64, 0.5 → 191.25 → 191
    assert out[0, 0, :, 0, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # grey → RGB
    with pytest.raises(ValueError, match="channels"):
        to_detector_uint8(torch.zeros(1, 2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        to_detector_uint8(torch.zeros(3, 4, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        to_detector_uint8(torch.full((1, 3, 2, 2, 2), float("nan")))


def test_extractor_calls_the_detector_like_stylegan_v(standin_file):
    ext = I3DFeatureExtractor(str(standin_file))
    digest = hashlib.sha256(standin_file.read_bytes()).hexdigest()
    assert ext.sha256 == digest and ext.name == f"standin_i3d.pt@sha256:{digest[:12]}"
    assert DETECTOR_KWARGS == {"rescale": True, "resize": True, "return_features": True}
    v = _videos(3, seed=1)
    feats = ext.features(v)
    assert feats.dtype == torch.float64 and feats.shape == (3, 8)
    manual = torch.jit.load(str(standin_file))(to_detector_uint8(v), rescale=True, resize=True,
                                               return_features=True)
    torch.testing.assert_close(feats, manual.double(), rtol=0, atol=0)
    grey = ext.features(_videos(2, seed=2, channels=1))
    assert grey.shape == (2, 8)


def test_fvd_with_the_standin_detector(standin_file):
    ext = I3DFeatureExtractor(str(standin_file))
    ref, same, shifted = FeatureStats(), FeatureStats(), FeatureStats()
    for i in range(3):  # several batches per set, as the evaluation does
        ref.update(ext.features(_videos(16, seed=10 + i)))
        same.update(ext.features(_videos(16, seed=20 + i)))
        shifted.update(ext.features(_videos(16, seed=20 + i, shift=0.6)))
    assert ref.num == 48 and ref.dim == 8
    assert fvd_from_stats(ref, ref) == pytest.approx(0.0, abs=1e-9)
    fvd_same, fvd_shifted = fvd_from_stats(ref, same), fvd_from_stats(ref, shifted)
    assert fvd_shifted > 10 * fvd_same > 0


def test_extractor_reports_a_wrong_output_shape(tmp_path):
    class Logits4D(nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            return x.float()[:, :, 0]

    path = tmp_path / "bad.pt"
    torch.jit.script(Logits4D()).save(str(path))
    with pytest.raises(RuntimeError, match=r"bad\.pt@sha256:.*expected features \[2, D\]"):
        I3DFeatureExtractor(str(path)).features(_videos(2, seed=0))


# --------------------------------------------------------------------------------------------------
# resolve_detector against a real HTTP server on loopback
# --------------------------------------------------------------------------------------------------
class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.answered = files, [], []
        self.release = threading.Event()  # /slow requests wait for it (10 s at most)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path.startswith("/slow"):
                    server.release.wait(10)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "not here")
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                server.answered.append(self.path)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server(standin_file):
    srv = _Server({"/files/i3d_torchscript.pt?dl=1": standin_file.read_bytes(),
                   "/slow/i3d.pt": b"late"})
    yield srv
    srv.close()


def test_download_once_then_reuse_the_cache(server, tmp_path, standin_file):
    url = server.base + "/files/i3d_torchscript.pt?dl=1"
    cache = tmp_path / "cache"
    path = resolve_detector(url, cache_dir=cache)
    assert path.name == "i3d_torchscript.pt" and path.is_relative_to(cache)
    assert path.read_bytes() == standin_file.read_bytes()
    assert len(server.requests) == 1
    assert [p.name for p in path.parent.iterdir()] == ["i3d_torchscript.pt"]  # no temporary left behind
    assert resolve_detector(url, cache_dir=cache) == path
    assert len(server.requests) == 1  # served from the cache
    ext = I3DFeatureExtractor(url, cache_dir=cache)  # the extractor resolves URLs the same way
    assert ext.path == path and len(server.requests) == 1
    assert ext.features(_videos(2, seed=3)).shape == (2, 8)


def test_default_cache_dir_from_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("VDM_CACHE", str(tmp_path / "envcache"))
    path = resolve_detector(server.base + "/files/i3d_torchscript.pt?dl=1")
    assert path.is_relative_to(tmp_path / "envcache") and path.is_file()


def test_http_404_names_the_url(server, tmp_path):
    url = server.base + "/files/missing.pt"
    with pytest.raises(DetectorDownloadError, match="404") as err:
        resolve_detector(url, cache_dir=tmp_path)
    assert url in str(err.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing cached, no partial file


def test_timeout_names_the_url(server, tmp_path):
    url = server.base + "/slow/i3d.pt"
    with pytest.raises(DetectorDownloadError) as err:
        resolve_detector(url, cache_dir=tmp_path, timeout=0.2)
    assert server.requests == ["/slow/i3d.pt"] and server.answered == []  # gave up; the server never answered
    assert url in str(err.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_missing_local_path_and_unsupported_scheme(tmp_path):
    missing = tmp_path / "nope" / "i3d_torchscript.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_detector(str(missing))
    with pytest.raises(FileNotFoundError, match="nope"):
        I3DFeatureExtractor(str(missing))
    with pytest.raises(ValueError, match="s3://bucket/i3d.pt"):
        resolve_detector("s3://bucket/i3d.pt")
    local = tmp_path / "d.pt"
    local.write_bytes(b"x")
    assert resolve_detector(str(local)) == local
    assert os.path.samefile(resolve_detector(str(local), cache_dir=tmp_path / "unused"), local)
    assert not (tmp_path / "unused").exists()  # a local path never touches the cache
