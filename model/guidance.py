"""Conditioning a sampler on observed data: classifier-free guidance (paper eq. 6), reconstruction
guidance (eqs. 7, 8) and the replacement baseline.

A guide has three hooks the sampler calls: `replace(z, logsnr, generator)` after every update of z,
`predict_x(predict, z, logsnr)` around the model's x̂, and `finalize(x)` on the result (the `Guide`
protocol; SGM's `Guider` plays the same part). Keeping them here leaves `sampling.sample` a plain loop
over the update equations, and any object with these hooks can guide it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from model.config import SamplingConfig
from model.diffusion import alpha_sigma, broadcast_to
from model.observation import FrameSelection, Observation


def cfg_combine(out_cond: Tensor, out_uncond: Tensor, weight: float) -> Tensor:
    """Classifier-free guidance (eq. 6): (1 + w) ε̂_c - w ε̂_u.

    The weights sum to one, so the combination commutes with the affine maps between the eps, v and x
    parameterisations (z fixed): combining the raw outputs of any parameterisation equals combining
    in eps space, and avoids converting twice through a 1/α that is ~2e4 at λ = -20.
    """
    return (1.0 + weight) * out_cond - weight * out_uncond


@runtime_checkable
class Guide(Protocol):
    """What `sampling.sample(guide=...)` calls; `Replacement` and `ReconstructionGuidance` are two.

    An optional `x_a` tensor attribute tells `sample` which device the caller's tensors live on.
    """

    def replace(self, z: Tensor, logsnr: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z after an update of the sampler, with whatever the guide imposes (z itself if nothing)."""
        ...

    def predict_x(self, predict: Callable[[Tensor], Tensor], z: Tensor, logsnr: Tensor) -> Tensor:
        """The x̂ the sampler uses at z; `predict(z)` is the model's own (after CFG)."""
        ...

    def finalize(self, x: Tensor) -> Tensor:
        """The sampler's result x, with whatever the guide imposes on it."""
        ...


class Replacement:
    """Baseline conditioning: the observed part of z is overwritten by a fresh draw of q(z_t | x_a).

    x_a is full-shaped (values outside `mask` are ignored); mask is boolean, broadcastable to z, True
    where observed. Known to be biased: the model's x̂_b only sees the noisy z_a, not x_a itself.
    """

    def __init__(self, x_a: Tensor, mask: Tensor) -> None:
        self.x_a = x_a
        self.mask = torch.as_tensor(mask, dtype=torch.bool, device=x_a.device)
        try:
            ok = torch.broadcast_shapes(self.mask.shape, x_a.shape) == x_a.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask {tuple(self.mask.shape)} does not broadcast to x_a {tuple(x_a.shape)}")

    def replace(self, z: Tensor, logsnr: Tensor, generator: torch.Generator | None = None) -> Tensor:
        alpha, sigma = alpha_sigma(torch.as_tensor(logsnr, dtype=torch.float64))
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        x_a = self.x_a.to(device=z.device, dtype=z.dtype)
        z_a = broadcast_to(alpha.to(z.dtype), z) * x_a + broadcast_to(sigma.to(z.dtype), z) * noise
        return torch.where(self.mask.to(z.device), z_a, z)

    def predict_x(self, predict: Callable[[Tensor], Tensor], z: Tensor, logsnr: Tensor) -> Tensor:
        return predict(z)

    def finalize(self, x: Tensor) -> Tensor:
        return torch.where(self.mask.to(x.device), self.x_a.to(device=x.device, dtype=x.dtype), x)


class ReconstructionGuidance:
    """x̃ = x̂ - (w_r α_t / 2) ∇_z ||x_a - observe(x̂(z))||² (eq. 7 for extension, eq. 8 for super-resolution).

    observe maps a full video [B, C, T, H, W] to the observed part shaped like x_a (first frames, or a
    downsampling). The gradient is w.r.t. the whole z. With w_r = 1 the correction is exactly the
    conditional score of the approximation q(x_a | z_t) ≈ N(observe(x̂), σ_t²/α_t² I), i.e. it moves x̂
    towards E[x | z_t, x_a]; that approximation is too wide at high noise, hence the paper's w_r > 1.
    `replacement` (optional) additionally sets the observed part of z from q(z_t | x_a), as the paper
    does for the conditioning frames of extension.
    """

    def __init__(
        self,
        x_a: Tensor,
        observe: Callable[[Tensor], Tensor],
        weight: float,
        replacement: Replacement | None = None,
    ) -> None:
        self.x_a = x_a
        self.observe = observe
        self.weight = float(weight)
        self.replacement = replacement

    def replace(self, z: Tensor, logsnr: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return z if self.replacement is None else self.replacement.replace(z, logsnr, generator)

    def predict_x(self, predict: Callable[[Tensor], Tensor], z: Tensor, logsnr: Tensor) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("reconstruction guidance needs gradients: sample under torch.no_grad(), "
                               "not torch.inference_mode()")
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            x_hat = predict(z_in)
            observed = self.observe(x_hat)
            x_a = self.x_a.to(device=observed.device, dtype=observed.dtype)
            if observed.shape != x_a.shape:
                raise ValueError(f"observe(x) has shape {tuple(observed.shape)} but x_a is {tuple(x_a.shape)}")
            # sum over the batch: rows are independent, so each row gets its own gradient
            diff = x_a - observed
            if diff.dtype in (torch.float16, torch.bfloat16):
                diff = diff.float()  # the squared error in at least fp32; float64 stays float64
            err = diff.square().sum()
            (grad,) = torch.autograd.grad(err, z_in)
        alpha, _ = alpha_sigma(torch.as_tensor(logsnr, dtype=torch.float64, device=z.device))
        step = broadcast_to((0.5 * self.weight * alpha).to(z.dtype), z)
        return x_hat.detach() - step * grad.to(z.dtype)

    def finalize(self, x: Tensor) -> Tensor:
        return x if self.replacement is None else self.replacement.finalize(x)


class ProjectionReplacement:
    """Replacement for an observation whose values are not coordinates of x (average pooling): after
    every update the component of z in the operator's row space is set from a fresh draw of
    q(H z_t | y) = N(α_t y, σ_t² c² I), the rest of z kept; the result gets H x = y the same way.

    `op` is a `model.observation.Observation` with H Hᵀ = c² I (c = op.noise_scale), so its `lift`
    H⁺ makes H⁺H the orthogonal projection onto the row space: z + H⁺(target − H z) changes only
    that component (ILVR, Choi et al. 2021). For a frame selection this is exactly `Replacement`.
    """

    def __init__(self, y: Tensor, op: Observation) -> None:
        self.x_a = y  # named like the other guides' observed tensor (sample() reads its device)
        self.op = op

    def replace(self, z: Tensor, logsnr: Tensor, generator: torch.Generator | None = None) -> Tensor:
        alpha, sigma = alpha_sigma(torch.as_tensor(logsnr, dtype=torch.float64))
        y = self.x_a.to(device=z.device, dtype=z.dtype)
        noise = torch.randn(y.shape, generator=generator, device=z.device, dtype=z.dtype)
        target = alpha.to(z.dtype) * y + (sigma * self.op.noise_scale).to(z.dtype) * noise
        return z + self.op.lift(target - self.op.observe(z))

    def predict_x(self, predict: Callable[[Tensor], Tensor], z: Tensor, logsnr: Tensor) -> Tensor:
        return predict(z)

    def finalize(self, x: Tensor) -> Tensor:
        return x + self.op.lift(self.x_a.to(device=x.device, dtype=x.dtype) - self.op.observe(x))


GUIDANCE_KINDS = ("reconstruction", "replacement")


def replacement_for(op: Observation, y: Tensor) -> Replacement | ProjectionReplacement:
    """The replacement baseline for observation `op` and observed tensor y: a full-shaped x_a and a
    mask where the operator selects coordinates (it has `mask()`), a projection otherwise."""
    if hasattr(op, "mask"):
        return Replacement(op.lift(y), op.mask(y.device))
    return ProjectionReplacement(y, op)


def observation_guide(op: Observation, y: Tensor, kind: str = "reconstruction",
                      weight: float = SamplingConfig.reconstruction_weight, replace: bool = True) -> Guide:
    """The guide for one conditional task: observation operator `op` (`model.observation`) and the
    observed tensor y = op.observe(truth).

    kind "replacement": the baseline alone. kind "reconstruction": eq. 7/8 with weight w_r on
    `op.observe`, and (replace=True, as the paper does for the conditioning frames of extension) the
    replacement on top, so the observed part of the result is y exactly.
    """
    if y.ndim != 5:
        raise ValueError(f"observed tensor must be [B, C, T, H, W], got shape {tuple(y.shape)}")
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"guidance={kind!r} is not one of {', '.join(GUIDANCE_KINDS)}")
    replacement = replacement_for(op, y)
    if kind == "replacement":
        return replacement
    return ReconstructionGuidance(y, op.observe, weight, replacement=replacement if replace else None)


def frame_guide(
    context: Tensor, window_frames: int, kind: str = "reconstruction", weight: float = SamplingConfig.reconstruction_weight
) -> Guide:
    """Guide for a window of `window_frames` frames whose first frames are `context` [B, C, k, H, W]:
    extension, i.e. the prediction operator applied to the model's own frames."""
    return observation_guide(FrameSelection.first(context.shape[2], window_frames), context, kind, weight)
