"""Motion conditioning: the clip's global motion as a per-frame conditioning term, predicted from the
caption at sampling time.

Why (docs/motion.md, "Which factor of the product is missing"): the sign of captioned motion needs the
product caption-direction x frame position in every frame's conditioning. Handed a clean factor (±1
from the caption) the model learns left/right in 600 steps and four directions in 1500; a factor that
must be learned through the diffusion loss never becomes clean (it collapses, or any other word in
the caption keeps it at chance). So the factor gets its own, strong signal: in training it is the
clip's *measured* global motion (clean from step 0), and a small head learns to predict that
measurement from the caption by regression, an auxiliary loss the model returns next to its output
(`regression_loss`; the trainer adds it with model.motion_loss_weight); sampling uses the prediction
(or a motion the user gives). The same idea as Stable Video Diffusion's motion-bucket
micro-conditioning, with the value predicted from the text instead of set by hand.

The motion is a similarity transform fitted to the whole clip (`global_motion`): pan x/y, zoom and
rotation, the camera moves and the simple object motions captions name (common/global_motion.py, shared
with data_pipeline.shard, which measures it on the full decoded frame and stores it with each clip, so
training reads it from the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.global_motion import MOTION_DIMS, MOTION_FIELDS, global_motion
from model.blocks import sinusoidal_embedding, zero_module

__all__ = ["MOTION_DIMS", "MOTION_FIELDS", "MotionConditioning", "global_motion"]

_FRAME_FEATURES = 32


class MotionConditioning(nn.Module):
    """Caption -> predicted global motion, and motion x frame position -> each frame's conditioning.

    The per-frame term is sum_k m_k P_k(t): a product of the motion and a learned code of the frame
    index (zero-initialised, so a new model starts without it), which is the form the hand-read
    diagnostic showed the network takes up.
    """

    def __init__(self, text_dim: int, cond_dim: int, scale: float):
        super().__init__()
        self.scale = scale
        self.head = nn.Sequential(nn.Linear(text_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, MOTION_DIMS))
        self.frame_code = zero_module(nn.Linear(_FRAME_FEATURES, MOTION_DIMS * cond_dim))

    def predict(self, text_emb: Tensor, text_mask: Tensor) -> Tensor:
        """[B, L, text_dim], [B, L] bool -> [B, 4]: the motion the caption describes (masked mean of the
        layer-normed tokens through a small MLP; a plain read, so no word is favoured by a pool)."""
        tokens = F.layer_norm(text_emb, text_emb.shape[-1:])
        m = text_mask.to(tokens.dtype)[..., None]
        return self.head((tokens * m).sum(1) / m.sum(1).clamp(min=1))

    @staticmethod
    def motion(predicted: Tensor, measured: Tensor | None, captioned: Tensor) -> Tensor:
        """The motion the frames are conditioned on: measured (training: teacher forcing, so the frames
        see a clean value from step 0) or predicted; zero in rows without a caption (the unconditional
        branch of guidance). No gradient reaches the head this way: it learns from `regression_loss`."""
        keep = captioned.to(predicted.dtype)[:, None]
        chosen = predicted if measured is None else measured.to(device=predicted.device, dtype=predicted.dtype)
        return chosen.detach() * keep

    @staticmethod
    def regression_loss(predicted: Tensor, measured: Tensor, captioned: Tensor) -> Tensor:
        """sum over the captioned rows of ||predicted - measured||^2, over the batch size: a mean over the
        micro-batch like the diffusion loss, so the trainer's grad_accum division and the strategies'
        averaging over ranks make it the mean over the global batch (rows without a caption have
        nothing to predict from and count zero)."""
        err = (predicted.float() - measured.to(predicted.device).float()).square().sum(1)
        return (err * captioned.float()).sum() / predicted.shape[0]

    def forward(self, motion: Tensor, frames: int) -> Tensor:
        """[B, 4] -> [B, frames, cond_dim]."""
        index = torch.arange(frames, device=motion.device, dtype=torch.float32)
        features = sinusoidal_embedding(index, _FRAME_FEATURES, max_period=100.0).to(self.frame_code.weight.dtype)
        code = self.frame_code(features).reshape(frames, MOTION_DIMS, -1)
        return torch.einsum("bk,fkd->bfd", (motion * self.scale).to(code.dtype), code)
