"""A scripted stand-in for the I3D TorchScript FVD detector (tests never download the real one)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class StandInI3D(nn.Module):
    """Same call signature as the I3D TorchScript: uint8 [B, 3, T, H, W]; rescale maps [0, 255] → [-1, 1];
    resize brings frames to a fixed size (16 here, 224 in the real one); features or logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = x.float()
        if rescale:
            x = x / 255.0 * 2.0 - 1.0
        if resize:
            x = F.interpolate(x, size=[x.shape[2], 16, 16], mode="trilinear", align_corners=False)
        feats = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        if return_features:
            return feats
        return self.head(feats)


def save_standin_i3d(path: Path) -> Path:
    """Script and save a StandInI3D with fixed weights; loadable by trainer.fvd.I3DFeatureExtractor."""
    torch.manual_seed(0)
    torch.jit.script(StandInI3D().eval()).save(str(path))
    return path
