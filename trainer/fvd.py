"""Fréchet Video Distance (FVD): I3D features of two sets of clips → Gaussians → Fréchet distance.

FVD (Unterthiner et al. 2018) fits a Gaussian to the features of each set and reports
    ||μ1 − μ2||² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½).
The maths is small pure functions in float64 (`frechet_distance`, `trace_sqrt_product`), the running
statistics are `FeatureStats`, and the detector is the TorchScript I3D that the common PyTorch FVD
implementations share, found through `resolve_detector` and run by `I3DFeatureExtractor`.

Detector call convention (the public code we read; we wrote our own):
- universome/stylegan-v `src/metrics/frechet_video_distance.py`: the detector is
  `https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1` (a TorchScript port of the
  tf.hub I3D of the original TF FVD) called with `rescale=True, resize=True, return_features=True`
  (features before the softmax, 400-d). `src/metrics/metric_utils.py` builds the input: clips as
  `[B, C, T, H, W]` (permuted from [B, T, C, H, W]), generator output in [-1, 1] mapped by
  `(x * 127.5 + 128).clamp(0, 255).to(torch.uint8)`, dataset clips fed as their uint8 frames, a
  single grey channel repeated to 3, then `detector(videos, **detector_kwargs)`.
- The maintainer's answers on what the flags do: universome/fvd-comparison issue #4 ("`rescale=True`
  performs `x = x / 255 * 2 - 1`", i.e. [0, 255] → [-1, 1], the range the I3D layers expect) and
  universome/stylegan-v issue #41 ("takes [0, 255] videos in uint8 format and performs all the
  normalization internally"); `resize=True` resizes frames to the I3D's 224x224 inside the detector
  (ragor114/PyTorch-Frechet-Video-Distance issue #2: "the resizing is done implicitly"). We could not
  read the TorchScript file itself offline, so its resize mode is not pinned down here.
- The other convention in use: JunyaoHu/common_metrics_on_video_quality `fvd/styleganv/fvd.py` and
  universome/fvd-comparison `compare_models.py` resize/crop to 224 themselves, scale to [-1, 1] and
  call with `rescale=False, resize=False, return_features=True` (the first argument is named `x`).
We follow StyleGAN-V: quantise to uint8 exactly as above and let the detector rescale and resize.
Real clips are stored as uint8 frames, so real and generated clips then take the same path.

Covariance estimator: implementations differ. StyleGAN-V's `FeatureStats.get_mean_cov` (also used by
songweige/content-debiased-fvd `cdfvd/utils/metric_utils.py`) divides by N (ddof=0); the original TF
FVD (tfgan `frechet_classifier_distance`, unbiased `n/(n-1)` covariance), fvd-comparison `our_fvd.py`
and common_metrics (`np.cov(rowvar=False)`) divide by N−1. Our default is ddof=1; `FeatureStats(ddof=0)`
reproduces StyleGAN-V's numbers. The two differ by a factor N/(N−1) on the covariances: negligible
at the usual 2048 clips, visible on small evaluation sets — compare scores made with the same N and
the same ddof only.

The detector's own needs (e.g. a minimum clip length T) are the detector's business: we pass clips
through unchanged and let it raise.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Keyword arguments of the I3D TorchScript call (StyleGAN-V's `detector_kwargs`): input uint8 [0, 255],
#: the detector rescales to [-1, 1] and resizes to 224x224 itself, and returns pre-softmax features.
DETECTOR_KWARGS = {"rescale": True, "resize": True, "return_features": True}
#: The detector StyleGAN-V and most PyTorch FVD code use (Kinetics-400 I3D, tf.hub weights).
I3D_TORCHSCRIPT_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


def _as_float64(x) -> np.ndarray:
    """numpy or torch (any float dtype, any device) → numpy float64, without a float32 detour."""
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Fréchet distance between two Gaussians
# --------------------------------------------------------------------------------------------------
def _clamp_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix as computed → the ones rounding cannot tell from 0 set to 0.

    A symmetric eigensolver returns each eigenvalue to within about n·eps·max|λ|, so a true 0 comes
    back as ±1e-15·max|λ| (negative ones would make sqrt NaN), and taking the square root amplifies
    that noise to ~3e-8·sqrt(max|λ|) per eigenvalue. Values below that bound (the same tolerance
    np.linalg.matrix_rank uses) are zeroed, so singular covariances give exact answers.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * np.max(np.abs(w), initial=0.0)
    return np.where(w > tol, w, 0.0)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix, via eigh (see `_clamp_eigenvalues`)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_clamp_eigenvalues(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ1 Σ2)^½) for symmetric PSD Σ1, Σ2, in real float64 arithmetic.

    Σ1 Σ2 is not symmetric, so taking its square root directly (scipy.linalg.sqrtm, as StyleGAN-V does)
    goes through a complex Schur form and returns spurious imaginary parts, or NaNs, when the
    covariances are singular — the usual case when a set has fewer clips than feature dimensions.
    Σ1 Σ2 is similar to M = Σ1^½ Σ2 Σ1^½ (same eigenvalues), and M is symmetric PSD, so
    tr((Σ1 Σ2)^½) = Σ_i sqrt(eig_i(M)) with a symmetric eigensolver, in real arithmetic. Rounding
    leaves eigenvalues of about ±1e-15·max|λ| (negative ones included) where the true value is 0;
    those are set to 0 before the square root (`_clamp_eigenvalues`).
    """
    root1 = psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrise what rounding broke, eigvalsh reads one triangle
    return float(np.sqrt(_clamp_eigenvalues(w)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||μ1 − μ2||² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½), all in float64.

    Accepts numpy arrays or torch tensors, converted to float64 first: the score is a small
    difference of large traces and means, which float32 rounding visibly moves.
    """
    mu1, mu2, sigma1, sigma2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-D of the same length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be [{d}, {d}] to match the means, got {s.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has NaN or inf entries")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


# --------------------------------------------------------------------------------------------------
# Running feature statistics
# --------------------------------------------------------------------------------------------------
class FeatureStats:
    """Running mean and covariance in float64 of feature batches [N, D].

    Batches are combined with the pairwise update of Chan, Golub & LeVeque (count, mean, sum of
    squared deviations M2) rather than StyleGAN-V's raw sums Σx and Σxxᵀ: the raw form subtracts two
    large numbers (E[xxᵀ] − μμᵀ) and loses the covariance when the means are large next to the
    spread; the pairwise form only ever adds non-negative terms. `merge` combines stats gathered
    elsewhere (another rank, another shard of the evaluation set) with the same update.

    ddof: 1 (default) divides by N−1 like the original TF FVD and np.cov; 0 divides by N like
    StyleGAN-V (see the module docstring).
    """

    def __init__(self, ddof: int = 1):
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
        self.ddof = ddof
        self._n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # Σ_i (x_i − mean)(x_i − mean)ᵀ

    @property
    def num(self) -> int:
        """Number of feature rows seen."""
        return self._n

    @property
    def dim(self) -> int | None:
        """Feature dimension, None before the first non-empty batch."""
        return None if self._mean is None else int(self._mean.shape[0])

    def update(self, feats) -> None:
        """Add a batch of features [N, D] (numpy or torch, any float dtype); N = 0 is a no-op."""
        x = _as_float64(feats)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if not np.isfinite(x).all():
            raise ValueError("features have NaN or inf entries (a diverged sample or a broken detector?)")
        mean = x.mean(axis=0)
        dev = x - mean
        self._combine(x.shape[0], mean, dev.T @ dev)

    def merge(self, other: FeatureStats) -> None:
        """Fold another FeatureStats into this one (as if its batches had been given to `update`)."""
        if other._n:
            self._combine(other._n, other._mean, other._m2)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self._mean is None:
            self._n, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        if mean_b.shape != self._mean.shape:
            raise ValueError(f"feature dimension changed: had {self._mean.shape[0]}, got {mean_b.shape[0]}")
        n_a, n = self._n, self._n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self._n = n

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [D], covariance [D, D]), float64. Needs at least 2 clips: one gives no covariance."""
        if self._n < 2:
            raise ValueError(f"FVD needs at least 2 clips per set to estimate a covariance, got {self._n}")
        cov = self._m2 / (self._n - self.ddof)
        return self._mean.copy(), (cov + cov.T) / 2


def fvd_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets."""
    if a.dim is not None and b.dim is not None and a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim} (different detectors?)")
    mu1, sigma1 = a.mean_cov()
    mu2, sigma2 = b.mean_cov()
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# --------------------------------------------------------------------------------------------------
# Finding the detector file
# --------------------------------------------------------------------------------------------------
class DetectorDownloadError(RuntimeError):
    """The detector could not be downloaded; the message names the URL."""


def default_cache_dir() -> Path:
    """$VDM_CACHE if set (used as the directory itself), else ~/.cache/vdm/fvd."""
    env = os.environ.get("VDM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vdm" / "fvd"


def _cache_path(url: str, cache_dir: Path) -> Path:
    """cache_dir/<sha256(url)[:16]>/<file name of the URL path>: one file per URL, with its real name
    kept (it ends up in the extractor's name) and query strings such as `?dl=1` dropped."""
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path).rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if name in ("", ".", ".."):
        name = "detector.pt"
    return cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def _download(url: str, dest: Path, timeout: float) -> None:
    """Stream `url` into a temporary file next to `dest`, then os.replace it into place: a reader never
    sees a partial file, and ranks racing on the same URL each replace it with a complete copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            req = urllib.request.Request(url, headers={"User-Agent": "vdm-fvd/1"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                size = 0
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    size += len(chunk)
                declared = resp.headers.get("Content-Length")
            f.flush()
            os.fsync(f.fileno())
        # a short or empty file would be cached and reused forever, so refuse it now
        if declared is not None and declared.isdigit() and int(declared) != size:
            raise DetectorDownloadError(f"FVD detector download from {url} is truncated: {size} of {declared} bytes")
        if size == 0:
            raise DetectorDownloadError(f"FVD detector download from {url} is empty")
        os.replace(tmp, dest)
    except DetectorDownloadError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DetectorDownloadError(f"could not download the FVD detector from {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # timeouts are OSErrors
        Path(tmp).unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DetectorDownloadError(
            f"could not download the FVD detector from {url} (timeout {timeout}s): {type(e).__name__}: {reason}"
        ) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_detector(path_or_url: str, cache_dir: str | Path | None = None, *,
                     timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """A local detector file, or an http(s) URL downloaded once into `cache_dir` and reused after.

    cache_dir defaults to `default_cache_dir()`. `timeout` bounds each blocking network operation
    (connect, each read). A cached file is reused without touching the network.
    """
    text = str(path_or_url)
    scheme = urllib.parse.urlparse(text).scheme.lower() if "://" in text else ""
    if scheme in ("http", "https"):
        dest = _cache_path(text, Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())
        if not dest.is_file():
            _download(text, dest, timeout)
        return dest
    if scheme:
        raise ValueError(f"FVD detector {text!r}: only local paths and http(s) URLs are supported")
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FVD detector file not found: {path}")
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The feature extractor
# --------------------------------------------------------------------------------------------------
def to_detector_uint8(videos: Tensor) -> Tensor:
    """[B, C, T, H, W] in [-1, 1] → uint8 [B, 3, T, H, W], StyleGAN-V's quantisation.

    `(x * 127.5 + 128).clamp(0, 255)` then truncation to uint8 is round-half-up of x * 127.5 + 127.5:
    −1 → 0, 0 → 128, 1 → 255. One grey channel is repeated to RGB.
    """
    if videos.ndim != 5:
        raise ValueError(f"expected videos [B, C, T, H, W], got shape {tuple(videos.shape)}")
    if videos.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {videos.shape[1]} (videos must be [B, C, T, H, W])")
    x = videos.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError("videos have NaN or inf values")
    x = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1, 1)
    return x


class I3DFeatureExtractor:
    """The TorchScript I3D (or anything with its call signature) as a clip → feature function.

    `name` is "<file name>@sha256:<first 12 hex digits>", `sha256` the full digest of the file: log
    them with every score, since FVDs from different detectors (or conventions) are not comparable.
    """

    def __init__(self, path_or_url: str, device: str | torch.device = "cpu",
                 cache_dir: str | Path | None = None):
        self.path = resolve_detector(path_or_url, cache_dir)
        self.sha256 = file_sha256(self.path)
        self.name = f"{self.path.name}@sha256:{self.sha256[:12]}"
        self.device = torch.device(device)
        self.detector = torch.jit.load(str(self.path), map_location=self.device).eval()

    def __repr__(self) -> str:
        return f"I3DFeatureExtractor({self.name}, device={self.device})"

    @torch.no_grad()
    def features(self, videos: Tensor) -> Tensor:
        """videos float [B, C, T, H, W] in [-1, 1] → float64 features [B, D] on the CPU."""
        x = to_detector_uint8(videos.to(self.device))
        feats = self.detector(x, **DETECTOR_KWARGS)
        if not isinstance(feats, Tensor) or feats.ndim != 2 or feats.shape[0] != x.shape[0]:
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise RuntimeError(f"detector {self.name} returned {shape}, expected features [{x.shape[0]}, D]")
        return feats.to(device="cpu", dtype=torch.float64)
