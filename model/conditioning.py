"""Conditions the model takes from the clean training clip itself (not from the caption), owned by the
model side so the training step never asks which model options are on.

Each entry of `clip_conditions(cfg)` is a callable `(x, cond) -> dict` of extra keyword arguments for
the denoiser: `x` the clean batch [B, C, T, H, W] on its device, `cond` the caption conditioning built
so far (it holds `num_video_frames`). The trainer calls every entry on every training micro-batch and
passes what they return to the loss; at sampling the model predicts these conditions itself (the
motion head), so only training needs them. A new option of this kind adds an entry here and a keyword
to `SpaceTimeUNet.forward`, nothing in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from model.config import UNetConfig
from model.motion import global_motion

ClipCondition = Callable[[Tensor, dict], dict]


def measured_motion(x: Tensor, cond: dict) -> dict:
    """model.motion_conditioning: the clip's global motion over its video frames (not the joint image
    frames that follow them), which the U-Net conditions on and teaches its motion head to predict."""
    return {"motion": global_motion(x[:, :, :cond["num_video_frames"]])}


def clip_conditions(cfg: UNetConfig) -> tuple[ClipCondition, ...]:
    """The conditions this model configuration measures on each training clip, in order."""
    return (measured_motion,) if cfg.motion_conditioning else ()
