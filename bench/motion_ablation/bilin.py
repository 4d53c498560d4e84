"""frame-position conditioning that multiplies with the clip's conditioning: cond_t = cond + p(t) * (1 + G(cond))"""

import torch
from torch import nn

import model.unet as U


def apply() -> None:
    _init = U.SpaceTimeUNet.__init__

    def __init__(self, cfg):
        _init(self, cfg)
        self.frame_gate = nn.Linear(cfg.cond_dim, cfg.cond_dim)

    def per_frame_cond(self, cond, frames, num_video_frames, extra=None):
        nv = frames if num_video_frames is None else num_video_frames
        if nv < 2:
            return cond.repeat_interleave(frames, dim=0)
        pos = self.frame_embed(nv, device=cond.device).to(cond.dtype)
        pos = torch.cat([pos, pos.new_zeros(frames - nv, pos.shape[1])]) if nv < frames else pos
        gate = 1 + self.frame_gate(cond)  # [B, D]
        return (cond[:, None, :] + pos[None] * gate[:, None, :]).flatten(0, 1)

    U.SpaceTimeUNet.__init__ = __init__
    U.SpaceTimeUNet.per_frame_cond = per_frame_cond
