"""caption-dependent depthwise temporal kernel: y = conv_t(u) + sum_k K(cond)[ch, k] u[t + k - k//2], u = silu(norm(x))"""

import torch
import torch.nn.functional as F
from torch import nn

import model.blocks as B
from bench.motion_ablation.stage_override import pass_cond_to_temporal_conv


def apply() -> None:
    _init = B.TemporalConv.__init__

    def __init__(self, ch, groups, kernel=3):
        _init(self, ch, groups, kernel)
        self.kernel = kernel
        self.dyn = B.zero_module(nn.Linear(128, ch * kernel))

    def forward(self, x, frames, num_video_frames=None, cond=None):
        nv = frames if num_video_frames is None else num_video_frames
        if nv < 2:
            return x
        n, c, h, w = x.shape
        b = n // frames
        y = F.silu(self.norm(x)).reshape(b, frames, c, h, w)[:, :nv]
        y = y.permute(0, 3, 4, 2, 1).reshape(-1, c, nv)  # [(b h w), C, F]
        out = self.conv(y)
        if cond is not None:
            cb = cond if cond.shape[0] == b else cond.reshape(b, -1, cond.shape[-1])[:, 0]
            K = (
                self.dyn(cb)
                .reshape(b, 1, c, self.kernel)
                .expand(b, h * w, c, self.kernel)
                .reshape(-1, c, 1, self.kernel)
            )
            p = self.kernel // 2
            unf = F.pad(y, (p, p)).unfold(2, self.kernel, 1)  # [(bhw), C, F, k]
            out = out + (unf * K).sum(-1)
        out = out.reshape(b, h, w, c, nv).permute(0, 4, 3, 1, 2)
        if nv < frames:
            out = torch.cat([out, out.new_zeros(b, frames - nv, c, h, w)], dim=1)
        return x + out.reshape(n, c, h, w)

    B.TemporalConv.__init__ = __init__
    B.TemporalConv.forward = forward

    pass_cond_to_temporal_conv()
