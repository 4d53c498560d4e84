"""Motion conditioning: the clip's global motion as a per-frame conditioning term, predicted from the
caption at sampling time.

Why (docs/motion.md, "Which factor of the product is missing"): the sign of captioned motion needs the
product caption-direction x frame position in every frame's conditioning. Handed a clean factor (±1
from the caption) the model learns left/right in 600 steps and four directions in 1500; a factor that
must be learned through the diffusion loss never becomes clean (it collapses, or any other word in
the caption keeps it at chance). So the factor gets its own, strong signal: in training it is the
clip's *measured* global motion (clean from step 0), and a small head learns to predict that
measurement from the caption by regression; sampling uses the prediction (or a motion the user
gives). The same idea as Stable Video Diffusion's motion-bucket micro-conditioning, with the value
predicted from the text instead of set by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks import sinusoidal_embedding, zero_module

MOTION_DIMS = 2  # (dx, dy)
_FRAME_FEATURES = 32


def global_motion(video: Tensor) -> Tensor:
    """[B, C, F, H, W] -> [B, 2]: (dx, dy), the share of the frame width/height the content crosses over
    the clip (positive = right/down), as one translation fitted to all frames.

    Lucas-Kanade least squares, I_t + dx I_x + dy I_y = 0 over every pixel of every consecutive pair,
    on the channel mean smoothed by a 3x3 box (motion below a pixel per frame needs gradients wider
    than an edge): a closed-form 2x2 solve, no search, exact in sign for a translating pattern and
    biased low in magnitude when the motion per frame exceeds the smoothing. A clip with one frame or
    no texture gives zero.
    """
    if video.ndim != 5:
        raise ValueError(f"video must be [B, C, F, H, W], got {list(video.shape)}")
    b, _, f, h, w = video.shape
    if f < 2:
        return video.new_zeros(b, MOTION_DIMS, dtype=torch.float32)
    g = video.float().mean(1).reshape(b * f, 1, h, w)
    g = F.avg_pool2d(g, 3, stride=1, padding=1, count_include_pad=False).reshape(b, f, h, w)
    gx = (torch.roll(g, -1, 3) - torch.roll(g, 1, 3)) / 2
    gy = (torch.roll(g, -1, 2) - torch.roll(g, 1, 2)) / 2
    gx, gy = (gx[:, 1:] + gx[:, :-1]) / 2, (gy[:, 1:] + gy[:, :-1]) / 2  # at the middle of each pair
    gt = g[:, 1:] - g[:, :-1]
    dims = (1, 2, 3)
    a11, a12, a22 = (gx * gx).sum(dims), (gx * gy).sum(dims), (gy * gy).sum(dims)
    b1, b2 = -(gx * gt).sum(dims), -(gy * gt).sum(dims)
    det = a11 * a22 - a12 * a12
    ok = det > 1e-6 * (a11 + a22).square().clamp(min=1e-12)
    det = torch.where(ok, det, torch.ones_like(det))
    dx = torch.where(ok, (a22 * b1 - a12 * b2) / det, torch.zeros_like(det))
    dy = torch.where(ok, (a11 * b2 - a12 * b1) / det, torch.zeros_like(det))
    return torch.stack([dx * (f - 1) / w, dy * (f - 1) / h], dim=1)


class _TeachAndRegress(torch.autograd.Function):
    """Forward: the measured motion (teacher forcing). Backward: the gradient of
    weight * sum over the captioned rows of ||prediction - measured||^2 / B into the prediction,
    whatever arrives from above (rows without a caption have nothing to predict from).

    Why a gradient injection instead of a second loss term: the strategies (DDP, FSDP2, ZeRO) own the
    forward and backward of the model, so an extra loss would need a side channel through every
    wrapper; this way the head learns in the one backward pass they already run. (fp16 loss scaling
    would shrink this gradient by the scale: the config refuses that combination.)
    """

    @staticmethod
    def forward(ctx, measured: Tensor, predicted: Tensor, rows: Tensor, weight: float) -> Tensor:
        ctx.save_for_backward(measured, predicted, rows)
        ctx.weight = weight
        return measured.to(predicted.dtype).clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        measured, predicted, rows = ctx.saved_tensors
        diff = (predicted.float() - measured.float()) * rows.float()[:, None]
        grad = 2 * ctx.weight * diff / predicted.shape[0]
        return None, grad.to(predicted.dtype), None, None


class MotionConditioning(nn.Module):
    """Caption -> predicted global motion, and motion x frame position -> each frame's conditioning.

    The per-frame term is sum_k m_k P_k(t): a product of the motion and a learned code of the frame
    index (zero-initialised, so a new model starts without it), which is the form the hand-read
    diagnostic showed the network takes up.
    """

    def __init__(self, text_dim: int, cond_dim: int, scale: float, regression_weight: float = 1.0):
        super().__init__()
        self.scale = scale
        self.regression_weight = regression_weight
        self.head = nn.Sequential(nn.Linear(text_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, MOTION_DIMS))
        self.frame_code = zero_module(nn.Linear(_FRAME_FEATURES, MOTION_DIMS * cond_dim))

    def predict(self, text_emb: Tensor, text_mask: Tensor) -> Tensor:
        """[B, L, text_dim], [B, L] bool -> [B, 2]: the motion the caption describes (masked mean of the
        layer-normed tokens through a small MLP; a plain read, so no word is favoured by a pool)."""
        tokens = F.layer_norm(text_emb, text_emb.shape[-1:])
        m = text_mask.to(tokens.dtype)[..., None]
        return self.head((tokens * m).sum(1) / m.sum(1).clamp(min=1))

    def motion(self, predicted: Tensor, measured: Tensor | None, captioned: Tensor) -> Tensor:
        """The motion the frames are conditioned on: measured (training, teaching the head) or predicted;
        zero in rows without a caption (the unconditional branch of guidance)."""
        keep = captioned.to(predicted.dtype)[:, None]
        if measured is None:
            return predicted.detach() * keep
        return _TeachAndRegress.apply(measured.to(predicted.device), predicted, captioned, self.regression_weight) * keep

    def forward(self, motion: Tensor, frames: int) -> Tensor:
        """[B, 2] -> [B, frames, cond_dim]."""
        index = torch.arange(frames, device=motion.device, dtype=torch.float32)
        features = sinusoidal_embedding(index, _FRAME_FEATURES, max_period=100.0).to(self.frame_code.weight.dtype)
        code = self.frame_code(features).reshape(frames, MOTION_DIMS, -1)
        return torch.einsum("bk,fkd->bfd", (motion * self.scale).to(code.dtype), code)
