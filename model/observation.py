"""What is known of a video in conditional generation (paper section 3.1): linear observation operators.

Every conditional task is one operator H and one observed tensor y = H x (`model.guidance.observation_guide`
turns the pair into a guide):

- `FrameSelection.first(k, window)`: prediction and extension (the first k frames are known);
- `FrameSelection.every(factor, window)`: frame interpolation (every factor-th frame is known);
- `AveragePool(factor)`: spatial super-resolution (each factor x factor block's mean is known, eq. 8).

Reconstruction guidance needs only `observe(x)`, differentiated through. Replacement, the baseline,
writes the observed part into z: for a frame selection the observed values are coordinates of x, so
that is a full-shaped x_a plus a mask (`model.guidance.Replacement`). A pooled value is not a
coordinate of x, so there is no mask; replacement sets the component of z in the row space of H
instead (ILVR, Choi et al. 2021; `model.guidance.ProjectionReplacement`), with `lift`, the
pseudo-inverse of H, and `noise_scale`, the standard deviation of H applied to white noise. Both are
exact because H Hᵀ is a multiple of the identity for every operator here (H Hᵀ = I for a selection,
I / factor² for pooling), so H⁺ = Hᵀ (H Hᵀ)⁻¹ needs no solve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class Observation(Protocol):
    """A linear operator on videos [B, C, T, H, W]; `lift` is its pseudo-inverse (H⁺ y, full-shaped)."""

    noise_scale: float  # std of each observed value of H ε for white noise ε

    def observe(self, x: Tensor) -> Tensor:
        """The observed part of x (H x)."""
        ...

    def lift(self, y: Tensor) -> Tensor:
        """The least-norm full video whose observation is y (H⁺ y)."""
        ...

    def observed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of observe(x) for an x of `shape`."""
        ...


class FrameSelection:
    """Observes frames `indices` of a window of `window` frames; the others are generated."""

    noise_scale = 1.0

    def __init__(self, indices: Sequence[int], window: int) -> None:
        idx = sorted(set(int(i) for i in indices))
        if not idx or idx[0] < 0 or idx[-1] >= window or len(idx) == window:
            raise ValueError(f"observed frames {list(indices)} must be a non-empty proper subset of 0..{window - 1}")
        self.indices, self.window = idx, int(window)
        first, step = idx[0], (idx[1] - idx[0] if len(idx) > 1 else 1)
        if idx == list(range(first, idx[-1] + 1, step)):  # a slice: cheaper, and the gradient the same
            self._take: slice | Tensor = slice(first, idx[-1] + 1, step)
        else:
            self._take = torch.tensor(idx)

    @classmethod
    def first(cls, k: int, window: int) -> FrameSelection:
        """The first k frames (prediction; extension on the model's own frames)."""
        if not 0 < k < window:
            raise ValueError(f"context has {k} frames; need 0 < k < window_frames={window}")
        return cls(range(k), window)

    @classmethod
    def every(cls, factor: int, window: int) -> FrameSelection:
        """Frames 0, factor, 2 factor, ... (interpolation to `factor` times the frame rate)."""
        if factor < 2 or factor >= window:
            raise ValueError(f"interpolation factor {factor} must be in [2, {window - 1}] for windows of {window} frames")
        return cls(range(0, window, factor), window)

    def __repr__(self) -> str:
        return f"FrameSelection({self.indices}, window={self.window})"

    def _check(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[2] != self.window:
            raise ValueError(f"expected a video [B, C, {self.window}, H, W], got {tuple(x.shape)}")

    def observe(self, x: Tensor) -> Tensor:
        self._check(x)
        if isinstance(self._take, slice):
            return x[:, :, self._take]
        return x.index_select(2, self._take.to(x.device))

    def mask(self, device: torch.device | str | None = None) -> Tensor:
        """Boolean [1, 1, window, 1, 1], True at the observed frames."""
        m = torch.zeros((1, 1, self.window, 1, 1), dtype=torch.bool, device=device)
        m[:, :, self.indices] = True
        return m

    def lift(self, y: Tensor) -> Tensor:
        b, c, k, h, w = y.shape
        if k != len(self.indices):
            raise ValueError(f"{self!r} observes {len(self.indices)} frames, got {k}")
        x = torch.zeros((b, c, self.window, h, w), dtype=y.dtype, device=y.device)
        x[:, :, self.indices] = y
        return x

    def observed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        b, c, _, h, w = shape
        return (b, c, len(self.indices), h, w)


class AveragePool:
    """Observes each frame at 1/factor of its height and width: every factor x factor block's mean
    (area downsampling, what `trainer.evaluate` uses to make a low-resolution input from a clip)."""

    def __init__(self, factor: int) -> None:
        if int(factor) < 2:
            raise ValueError(f"upsampling factor must be >= 2, got {factor}")
        self.factor = int(factor)
        self.noise_scale = 1.0 / self.factor  # the mean of factor² independent unit normals

    def __repr__(self) -> str:
        return f"AveragePool({self.factor})"

    def observe(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[3] % self.factor or x.shape[4] % self.factor:
            raise ValueError(f"expected a video [B, C, T, H, W] with H and W divisible by {self.factor}, "
                             f"got {tuple(x.shape)}")
        s = self.factor
        return F.avg_pool3d(x, kernel_size=(1, s, s), stride=(1, s, s))

    def lift(self, y: Tensor) -> Tensor:
        """Each low-resolution pixel repeated over its block: Hᵀ (H Hᵀ)⁻¹ = factor² Hᵀ for mean pooling."""
        s = self.factor
        return y.repeat_interleave(s, dim=3).repeat_interleave(s, dim=4)

    def observed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        b, c, t, h, w = shape
        return (b, c, t, h // self.factor, w // self.factor)


def observation_matrix(op: Observation, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
    """H as a dense [observed dims, video dims] matrix for one sample of `shape` [1, C, T, H, W] (tests,
    closed forms): the operator applied to each basis video."""
    d = 1
    for n in shape[1:]:
        d *= int(n)
    basis = torch.eye(d, dtype=dtype).reshape(d, *shape[1:])
    return op.observe(basis).reshape(d, -1).T
