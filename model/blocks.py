"""Building blocks of the space-time factorised U-Net (paper section 3): space-only convolutions,
per-frame group norm, FiLM residual blocks, spatial down/upsampling and the log-SNR embedding.

Inside the U-Net activations live in the frames-folded layout [(B F), C, H, W]: the frame axis is a
batch axis, so no block in this module can mix information across frames. That is what lets frames beyond `num_video_frames` be independent images
(joint image+video training); only the temporal attention in `model.attention` mixes frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def divisor_groups(channels: int, groups: int) -> int:
    """Largest group count <= `groups` that divides `channels` (GroupNorm needs an exact split)."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm on the frames-folded layout [(B F), C, H, W], so statistics are per frame.

    nn.GroupNorm on [B, C, F, H, W] would pool statistics over all frames, so an image frame's
    output would depend on the other frames in its row and joint training would leak information.
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__(divisor_groups(channels, groups), channels, eps=eps)


class SpaceConv(nn.Conv3d):
    """A 2D conv of the image U-Net as a space-only 3D conv: kernel 1 x k x k, padding 0 x p x p.

    The parameters are those of the 1xkxk nn.Conv3d the paper describes, but it runs on the
    frames-folded layout [(B F), C, H, W] with conv2d: the same arithmetic, and on CPU about 1.5x
    faster than conv3d (PyTorch has no oneDNN path for conv3d there and falls back to slow_conv3d).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1):
        super().__init__(in_ch, out_ch, kernel_size=(1, kernel, kernel), stride=(1, stride, stride),
                         padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, 0], self.bias, stride=self.stride[1:], padding=self.padding[1:])


def space_conv(in_ch: int, out_ch: int, stride: int = 1) -> SpaceConv:
    """A 3x3 conv of the image U-Net, turned into a conv that never looks across frames."""
    return SpaceConv(in_ch, out_ch, 3, stride)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer that ends a residual branch, so each block starts as the identity (DDPM/ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """DDPM residual block with FiLM conditioning: the log-SNR + pooled-text embedding scales and
    shifts the normalised activations, so every block can adapt to the noise level and caption."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = FrameGroupNorm(in_ch, groups)
        self.conv1 = space_conv(in_ch, out_ch)
        self.film = nn.Linear(cond_dim, 2 * out_ch)
        self.norm2 = FrameGroupNorm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(space_conv(out_ch, out_ch))
        self.skip = SpaceConv(in_ch, out_ch, kernel=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [(B F), C, H, W] (frames folded into the batch); cond [B, cond_dim]."""
        h = self.conv1(F.silu(self.norm1(x)))
        film = self.film(F.silu(cond)).repeat_interleave(x.shape[0] // cond.shape[0], dim=0)
        scale, shift = film[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W with a strided space-only conv; the frame count is never reduced."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = space_conv(ch, ch, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (nearest) then smooth with a space-only conv; frames untouched."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = space_conv(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def logsnr_to_time(logsnr: torch.Tensor) -> torch.Tensor:
    """Map log-SNR in (-inf, inf) to t in (0, 1) by inverting the cosine schedule (as in the authors'
    diffusion_distillation U-Net). The embedding then sees well-spread values instead of a range of
    [-20, 20] whose ends are nearly indistinguishable for the network."""
    return torch.atan(torch.exp(-0.5 * logsnr.float().clamp(-20.0, 20.0))) / (0.5 * math.pi)


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer/DDPM sinusoidal features of a scalar per row: [B] -> [B, dim] (fp32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class LogSNREmbedding(nn.Module):
    """log-SNR -> conditioning vector [B, cond_dim] (sinusoidal features of 1000 t, then an MLP)."""

    def __init__(self, feature_dim: int, cond_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.mlp = nn.Sequential(nn.Linear(feature_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, logsnr: torch.Tensor) -> torch.Tensor:
        feats = sinusoidal_embedding(1000.0 * logsnr_to_time(logsnr), self.feature_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class FramePositionEmbedding(nn.Module):
    """Frame index -> a vector added to each video frame's conditioning (FiLM in every block).

    Why: everything else in the network is per frame or relative in time (the temporal attention's
    relative position bias), so on pure noise, where sampling starts, the frames are exchangeable:
    the network cannot tell frame 0 from frame 7 and cannot put the shape at "start + v t"; the
    caption then sets the axis of motion but the noise sets its sign (docs/model.md, "Learning the
    direction of motion"). Sinusoidal features of the index through a zero-initialised linear map,
    so a new model starts as the pure relative design. Image frames (joint training) get none.
    """

    def __init__(self, feature_dim: int, cond_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.proj = zero_module(nn.Linear(feature_dim, cond_dim))

    def forward(self, frames: int, device=None) -> torch.Tensor:
        """-> [frames, cond_dim]."""
        index = torch.arange(frames, device=device or self.proj.weight.device, dtype=torch.float32)
        return self.proj(sinusoidal_embedding(index, self.feature_dim, max_period=100.0).to(self.proj.weight.dtype))


class TemporalConv(nn.Module):
    """A residual convolution over frames only (kernel k x 1 x 1), per pixel: x + conv_t(silu(norm(x))).

    Why, next to temporal attention: attention mixes frames with weights, but the value it takes
    from frame t+k is the same projection for every offset k, so "an edge to my left one frame ago"
    and "one frame later" arrive looking alike and the sign of motion must be pieced together from
    one-sided heads. A temporal kernel has its own weights per offset, so a single layer after a
    spatial conv is a motion detector for a direction (see docs/model.md, "Learning the direction
    of motion"). Zero-initialised, so the block starts as the identity (Make-A-Video's pseudo-3D
    convolution starts the same way). Only the video frames are convolved: frames beyond
    `num_video_frames` are independent images and pass through unchanged.
    """

    def __init__(self, ch: int, groups: int, kernel: int = 3):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"temporal conv kernel must be odd and >= 1, got {kernel}")
        self.norm = FrameGroupNorm(ch, groups)
        self.conv = zero_module(nn.Conv1d(ch, ch, kernel, padding=kernel // 2))

    def forward(self, x: torch.Tensor, frames: int, num_video_frames: int | None = None) -> torch.Tensor:
        """x [(B F), C, H, W] (frames folded into the batch, F = `frames`)."""
        nv = frames if num_video_frames is None else num_video_frames
        if nv < 2:
            return x
        n, c, h, w = x.shape
        y = F.silu(self.norm(x)).reshape(n // frames, frames, c, h, w)[:, :nv]
        y = y.permute(0, 3, 4, 2, 1).reshape(-1, c, nv)  # [(b h w), C, F_video]
        y = self.conv(y).reshape(n // frames, h, w, c, nv).permute(0, 4, 3, 1, 2)
        if nv < frames:
            y = torch.cat([y, y.new_zeros(n // frames, frames - nv, c, h, w)], dim=1)
        return x + y.reshape(n, c, h, w)
