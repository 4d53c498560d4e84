"""caption-conditioned temporal conv: y = x + (1 + gamma(cond)) * conv_t(silu(norm(x)))"""

import torch.nn.functional as F
from torch import nn

import model.blocks as B
from bench.motion_ablation.stage_override import pass_cond_to_temporal_conv


def apply() -> None:
    _init = B.TemporalConv.__init__

    def __init__(self, ch, groups, kernel=3):
        _init(self, ch, groups, kernel)
        self.gate = B.zero_module(nn.Linear(128, ch))

    _fwd = B.TemporalConv.forward

    def forward(self, x, frames, num_video_frames=None, cond=None):
        y = _fwd(self, x, frames, num_video_frames) - x
        if cond is not None:
            g = self.gate(F.silu(cond))
            if g.shape[0] != x.shape[0]:
                g = g.repeat_interleave(x.shape[0] // g.shape[0], dim=0)
            y = y * (1 + g[:, :, None, None])
        return x + y

    B.TemporalConv.__init__ = __init__
    B.TemporalConv.forward = forward

    pass_cond_to_temporal_conv()
