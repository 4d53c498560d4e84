"""Motion conditioning with a caption -> motion head, each trained on its own signal.

cond_t = cond + sum_k s_k P_k(t), s = (dx, dy): the clip's global motion over the clip (Lucas-Kanade
least squares for one translation of all frames, in frames crossed per clip, x MOTION_SCALE). In
training s is *measured* from the clean clip (so the product has a clean factor from step 0, as the
hand-read diagnostic); at sampling s is *predicted* from the caption by a small head trained by MSE to
the measured motion (its own supervised signal instead of the diffusion loss). Dropped captions get
s = 0. MOTION_PRED_TRAIN=1 feeds the head's prediction in training too (no teacher forcing).
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

import model.diffusion as D
import model.unet as U
from model.blocks import sinusoidal_embedding, zero_module

_MODELS: list = []


def global_motion(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] in [-1, 1] -> [B, 2] (dx, dy) in frame widths/heights crossed over the clip."""
    b, c, f, h, w = x.shape
    g = x.float().mean(1)  # [B, F, H, W]
    g = F.avg_pool2d(g.reshape(b * f, 1, h, w), 3, 1, 1).reshape(b, f, h, w)  # smooth: sub-pixel motion
    ix = (torch.roll(g, -1, 3) - torch.roll(g, 1, 3)) / 2
    iy = (torch.roll(g, -1, 2) - torch.roll(g, 1, 2)) / 2
    it = g[:, 1:] - g[:, :-1]
    ix, iy = (ix[:, 1:] + ix[:, :-1]) / 2, (iy[:, 1:] + iy[:, :-1]) / 2
    a11, a12, a22 = (ix * ix).sum((1, 2, 3)), (ix * iy).sum((1, 2, 3)), (iy * iy).sum((1, 2, 3))
    b1, b2 = -(ix * it).sum((1, 2, 3)), -(iy * it).sum((1, 2, 3))
    det = (a11 * a22 - a12 * a12).clamp(min=1e-6)
    dx, dy = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det  # px per frame
    return torch.stack([dx * (f - 1) / w, dy * (f - 1) / h], 1)


def apply() -> None:
    scale = float(os.environ.get("MOTION_SCALE", "3"))
    _init = U.SpaceTimeUNet.__init__

    def __init__(self, cfg):
        _init(self, cfg)
        self.motion_head = nn.Sequential(nn.Linear(cfg.text_dim, 128), nn.SiLU(), nn.Linear(128, 2))
        self.motion_embed = zero_module(nn.Linear(32, 2 * cfg.cond_dim))
        self._target = None
        _MODELS.append(self)

    _enc = U.SpaceTimeUNet.encode_text

    def encode_text(self, text_emb, text_mask, batch):
        out = _enc(self, text_emb, text_mask, batch)
        self._pred = self._present = None
        if text_emb is not None:
            tm = text_mask.to(text_emb.dtype) if text_mask is not None else torch.ones(text_emb.shape[:2])
            t = F.layer_norm(text_emb, text_emb.shape[-1:])
            f = (t * tm[..., None]).sum(1) / tm.sum(1, keepdim=True).clamp(min=1)
            self._pred = self.motion_head(f)
            self._present = (tm.amax(1) > 0).to(text_emb.dtype)
        return out

    def per_frame_cond(self, cond, frames, num_video_frames, extra=None):
        nv = frames if num_video_frames is None else num_video_frames
        if nv < 2:
            return cond.repeat_interleave(frames, dim=0)
        pos = self.frame_embed(nv, device=cond.device).to(cond.dtype)[None].expand(cond.shape[0], -1, -1)
        if self._pred is not None:
            use_target = self.training and self._target is not None and not os.environ.get("MOTION_PRED_TRAIN")
            s = (self._target if use_target else self._pred.detach()) * scale * self._present[:, None]
            idx = torch.arange(nv, device=cond.device, dtype=torch.float32)
            P = self.motion_embed(sinusoidal_embedding(idx, 32, max_period=100.0).to(cond.dtype)).reshape(nv, 2, -1)
            pos = pos + torch.einsum("bk,fkd->bfd", s.to(cond.dtype), P)
        if nv < frames:
            pos = torch.cat([pos, pos.new_zeros(pos.shape[0], frames - nv, pos.shape[2])], dim=1)
        return (cond[:, None, :] + pos).flatten(0, 1)

    _loss_terms = D.GaussianDiffusion.loss_terms

    def loss_terms(self, denoiser, x, **cond):
        model = _MODELS[-1]
        nv = cond.get("num_video_frames") or x.shape[2]
        model._target = global_motion(x[:, :, :nv])
        per_sample, logsnr = _loss_terms(self, denoiser, x, **cond)
        if model._pred is not None and model.training:
            aux = (model._pred.float() - model._target).square().sum(1) * model._present.float()
            per_sample = per_sample + aux
        model._target = None
        return per_sample, logsnr

    U.SpaceTimeUNet.__init__ = __init__
    U.SpaceTimeUNet.encode_text = encode_text
    U.SpaceTimeUNet.per_frame_cond = per_frame_cond
    D.GaussianDiffusion.loss_terms = loss_terms
