"""Conditions the model takes from the training clip itself (not from the caption), and the weights of
the auxiliary losses it returns, owned by the model side so the training step never asks which model
options are on.

Each entry of `clip_conditions(cfg)` is a callable `(batch, x, cond) -> dict` of extra keyword arguments
for the denoiser: `batch` the loader's batch (where the data pipeline may have stored the condition,
measured once when the shards were made), `x` the clean batch [B, C, T, H, W] on its device, `cond`
the caption conditioning built so far (it holds `num_video_frames`). The trainer calls every entry on
every training and validation micro-batch; at sampling the model predicts these conditions itself
(the motion head), so only training needs them.

`aux_loss_weights(cfg)` names the losses `SpaceTimeUNet.forward(..., return_aux_losses=True)` returns
next to its output and the weight each is added to the diffusion loss with. A new option of this kind
adds an entry in each, and a keyword to the U-Net's forward, nothing in the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from common.global_motion import MOTION_DIMS, MOTION_FIELD, global_motion
from model.config import UNetConfig

log = logging.getLogger(__name__)

ClipCondition = Callable[[dict, Tensor, dict], dict]
_warned_on_the_fly = False


def measured_motion(batch: dict, x: Tensor, cond: dict) -> dict:
    """model.motion_conditioning: the clip's global motion (common.global_motion) over its video
    frames, which the U-Net conditions on and teaches its motion head to predict.

    Read from the batch, where data_pipeline.shard stored it (measured on the full decoded frame); rows
    of shards made before it did (NaN or no field) are measured here on the training clip's video
    frames (not the joint image frames that follow them), with a warning once."""
    stored = batch.get(MOTION_FIELD)
    if stored is not None and stored.shape != (x.shape[0], MOTION_DIMS):
        raise ValueError(f"batch[{MOTION_FIELD!r}] must be [B={x.shape[0]}, {MOTION_DIMS}], got {list(stored.shape)}")
    missing = None if stored is None else torch.isnan(stored).any(dim=1)
    if stored is not None and not missing.any():
        return {"motion": stored.to(x.device, torch.float32)}
    global _warned_on_the_fly
    if not _warned_on_the_fly:
        _warned_on_the_fly = True
        log.warning("model.motion_conditioning: some shards hold no %r in their {key}.json (made before "
                    "data_pipeline.shard measured it); measuring it on the fly on the training clips, "
                    "after resizing and cropping (re-shard to measure it on the full frame)", MOTION_FIELD)
    on_the_fly = global_motion(x[:, :, :cond["num_video_frames"]])
    if stored is None:
        return {"motion": on_the_fly}
    stored = stored.to(x.device, torch.float32)
    return {"motion": torch.where(missing.to(x.device)[:, None], on_the_fly, stored)}


def clip_conditions(cfg: UNetConfig) -> tuple[ClipCondition, ...]:
    """The conditions this model configuration measures on each training clip, in order."""
    return (measured_motion,) if cfg.motion_conditioning else ()


def aux_loss_weights(cfg: UNetConfig) -> dict[str, float]:
    """{name: weight} of the auxiliary losses this model configuration returns in training."""
    return {"motion_loss": cfg.motion_loss_weight} if cfg.motion_conditioning else {}
