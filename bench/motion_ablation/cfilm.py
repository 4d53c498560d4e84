"""general caption x frame-position product in the per-frame conditioning, from the pooled caption alone:

CFILM_K=0: cond_t = cond + P(t) * C(pooled)              (elementwise, C default init, P zero-init)
CFILM_K=k: cond_t = cond + sum_j s_j(pooled) P_j(t)      (k scalars from the caption, P_j zero-init)
"""

import os

import torch
from torch import nn

import model.blocks as B
import model.unet as U


def apply() -> None:
    K = int(os.environ.get("CFILM_K", "0"))
    _init = U.SpaceTimeUNet.__init__

    def __init__(self, cfg):
        _init(self, cfg)
        if K:
            self.cap_scalars = nn.Linear(cfg.cond_dim, K)
            self.cap_bn = nn.BatchNorm1d(K, affine=False) if os.environ.get("CFILM_BN") else nn.Identity()
            self.frame_embed_k = nn.Linear(self.frame_embed.feature_dim, K * cfg.cond_dim)
            if not os.environ.get("CFILM_RANDP"):
                B.zero_module(self.frame_embed_k)
            if os.environ.get("CFILM_TOKMAX"):
                self.cap_tok = nn.Linear(cfg.text_dim, K)
        else:
            self.cap_proj = nn.Linear(cfg.cond_dim, cfg.cond_dim)
            self.cap_bn = (
                nn.BatchNorm1d(cfg.cond_dim, affine=False) if os.environ.get("CFILM_BN") else nn.Identity()
            )

    _enc = U.SpaceTimeUNet.encode_text

    def encode_text(self, text_emb, text_mask, batch):
        pooled, context, mask = _enc(self, text_emb, text_mask, batch)
        self._pooled = pooled
        if K and os.environ.get("CFILM_TOKMAX"):
            if text_emb is None:
                self._tokmax = torch.zeros(batch, K, device=pooled.device)
            else:
                tm = (
                    text_mask.bool()
                    if text_mask is not None
                    else torch.ones(text_emb.shape[:2], dtype=torch.bool, device=text_emb.device)
                )
                sc = self.cap_tok(self.text_norm(text_emb.to(pooled.dtype)))  # [B, L, K]
                sc = sc.masked_fill(~tm[..., None], -1e4).amax(dim=1)
                self._tokmax = torch.where(tm.any(1, keepdim=True), sc, torch.zeros_like(sc))
        return pooled, context, mask

    def per_frame_cond(self, cond, frames, num_video_frames, extra=None):
        nv = frames if num_video_frames is None else num_video_frames
        if nv < 2:
            return cond.repeat_interleave(frames, dim=0)
        if K:
            idx = torch.arange(nv, device=cond.device, dtype=torch.float32)
            feats = B.sinusoidal_embedding(idx, self.frame_embed.feature_dim, max_period=100.0).to(cond.dtype)
            P = self.frame_embed_k(feats).reshape(nv, K, -1)  # [F, K, D]
            s = self.cap_bn(
                self._tokmax if os.environ.get("CFILM_TOKMAX") else self.cap_scalars(self._pooled)
            )  # [B, K]
            pos = torch.einsum("bk,fkd->bfd", s, P)
        else:
            pos = (
                self.frame_embed(nv, device=cond.device).to(cond.dtype)[None]
                * self.cap_bn(self.cap_proj(self._pooled))[:, None, :]
            )
        if nv < frames:
            pos = torch.cat([pos, pos.new_zeros(pos.shape[0], frames - nv, pos.shape[2])], dim=1)
        return (cond[:, None, :] + pos).flatten(0, 1)

    U.SpaceTimeUNet.__init__ = __init__
    U.SpaceTimeUNet.encode_text = encode_text
    U.SpaceTimeUNet.per_frame_cond = per_frame_cond
