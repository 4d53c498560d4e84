"""Exponential moving average of the trainable parameters this rank holds.

Kept over `strategy.local_params()`, so under FSDP2 / ZeRO-3 each rank averages only its own shard
(no gather per step, memory divides with the world size) and single/DDP average the full replica.
The shadow is fp32 even when the live parameters are bf16 (DeepSpeed bf16): at decay 0.9999 a bf16
shadow could not move at all, because each update is below bf16's resolution.
"""

from __future__ import annotations

import torch
from torch import Tensor


class EMA:
    def __init__(self, params: list[Tensor], decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.shadow = [p.detach().to(torch.float32).clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[Tensor]) -> None:
        """shadow <- decay * shadow + (1 - decay) * param, for each local tensor."""
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(params)}")
        for s, p in zip(self.shadow, params):
            s.mul_(self.decay).add_(p.detach().to(torch.float32), alpha=1.0 - self.decay)

    def state_dict(self) -> list[Tensor]:
        return [s.detach().cpu() for s in self.shadow]

    def load_state_dict(self, tensors: list[Tensor]) -> None:
        if len(tensors) != len(self.shadow):
            raise ValueError(f"EMA checkpoint has {len(tensors)} tensors, this model {len(self.shadow)}")
        for s, t in zip(self.shadow, tensors):
            if s.shape != t.shape:
                raise ValueError(f"EMA checkpoint tensor shape {tuple(t.shape)} != {tuple(s.shape)}")
            s.copy_(t.to(s.device))
