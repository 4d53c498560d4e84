"""A clip's global motion as one similarity transform (pan x/y, zoom, rotation), fitted in closed form.

Shared by the data pipeline, which measures it on every clip's full decoded frame when the shards are
made and stores it in the clip's `{key}.json` (as Stable Video Diffusion computes its motion bucket when
the data is prepared), and by the model (model/motion.py), which conditions on it in training and
measures it on the training clip itself only for shards made before it was stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MOTION_FIELD = "global_motion"  # the {key}.json key and the loader's batch field
MOTION_FIELDS = ("pan_x", "pan_y", "zoom", "rotation")
MOTION_DIMS = len(MOTION_FIELDS)


def similarity_basis(gx: Tensor, gy: Tensor, scale: float) -> Tensor:
    """Image gradients [..., H, W] -> [..., 4, H, W]: the brightness change per unit of each similarity
    parameter (pan x, pan y, zoom, rotation) at every pixel.

    The flow of a similarity about the frame centre, in units of the short side s, is
    u = s (tx + a X - b Y), v = s (ty + b X + a Y) with X, Y the pixel's offset from the centre over s
    (y down, so b > 0 turns clockwise on screen); brightness constancy gx u + gy v = -gt is linear in
    (tx, ty, a, b) with these four coefficients."""
    h, w = gx.shape[-2:]
    ys = (torch.arange(h, dtype=gx.dtype, device=gx.device) - (h - 1) / 2) / scale
    xs = (torch.arange(w, dtype=gx.dtype, device=gx.device) - (w - 1) / 2) / scale
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    gx, gy = gx * scale, gy * scale
    return torch.stack([gx, gy, gx * xx + gy * yy, gy * xx - gx * yy], dim=-3)


def global_motion(video: Tensor, work_size: int | None = None) -> Tensor:
    """[B, C, F, H, W] -> [B, 4]: (pan_x, pan_y, zoom, rotation) over the clip, one similarity transform
    fitted to all frames: pan as the share of the frame's short side the content crosses (positive =
    right/down), zoom as the relative growth in scale, rotation in radians (positive = clockwise).

    Lucas-Kanade least squares for the similarity's four parameters, I_t + J . p = 0 over every pixel
    of every consecutive pair (J = `similarity_basis`), on the channel mean smoothed by a 3x3 box
    (motion below a pixel per frame needs gradients wider than an edge): a closed-form 4x4 solve, no
    search, exact for a translating, scaling or turning pattern in the small-motion limit and biased
    low in magnitude when the motion per frame exceeds the smoothing. `work_size` (the short side)
    first area-averages larger frames down to it: the fit is linear only for motion of about a pixel
    per frame, so a full-resolution source is measured at a size where its motion is that small. A
    clip with one frame or no texture gives zero.
    """
    if video.ndim != 5:
        raise ValueError(f"video must be [B, C, F, H, W], got {list(video.shape)}")
    b, _, f, h, w = video.shape
    if f < 2 or h < 3 or w < 3:
        return video.new_zeros(b, MOTION_DIMS, dtype=torch.float32)
    g = video.float().mean(1).reshape(b * f, 1, h, w)
    if work_size is not None and min(h, w) > work_size:
        h, w = max(3, round(h * work_size / min(h, w))), max(3, round(w * work_size / min(h, w)))
        g = F.adaptive_avg_pool2d(g, (h, w))
    g = F.avg_pool2d(g, 3, stride=1, padding=1, count_include_pad=False).reshape(b, f, h, w)
    gx = (g[..., 1:-1, 2:] - g[..., 1:-1, :-2]) / 2  # central differences on the interior
    gy = (g[..., 2:, 1:-1] - g[..., :-2, 1:-1]) / 2
    gx, gy = (gx[:, 1:] + gx[:, :-1]) / 2, (gy[:, 1:] + gy[:, :-1]) / 2  # at the middle of each pair
    gt = g[:, 1:, 1:-1, 1:-1] - g[:, :-1, 1:-1, 1:-1]
    basis = similarity_basis(gx, gy, float(min(h, w)))  # [B, F-1, 4, H-2, W-2]
    basis = basis.transpose(1, 2).reshape(b, MOTION_DIMS, -1).double()  # every pixel of every pair
    normal = basis @ basis.transpose(1, 2)
    rhs = -(basis @ gt.reshape(b, -1, 1).double())[..., 0]
    trace = normal.diagonal(dim1=1, dim2=2).sum(-1)
    eye = torch.eye(MOTION_DIMS, dtype=normal.dtype, device=normal.device)
    # a ridge of 1e-6 of the mean curvature keeps a clip with texture along one axis only (a bar) solvable
    ridge = (1e-6 * trace / MOTION_DIMS).clamp(min=1e-12)[:, None, None] * eye
    params = torch.linalg.solve(normal + ridge, rhs[..., None])[..., 0]
    params = torch.where((trace > 1e-9)[:, None], params, torch.zeros_like(params))
    return (params * (f - 1)).float()
