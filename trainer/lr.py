"""Learning-rate schedule as one pure function of the step, so resume needs no scheduler state.

The LR at step s depends only on s and the config; a resumed run recomputes it instead of
restoring a scheduler object (nothing to get out of sync, nothing to unpickle).
"""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant",
          min_lr_ratio: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to base_lr over `warmup_steps`, then
    constant or cosine decay to base_lr * min_lr_ratio at `total_steps`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule {schedule!r} is not one of ['constant', 'cosine']")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_from_config(step: int, cfg) -> float:
    """`lr_at` with the values of a TrainConfig (optim section + run.steps)."""
    o = cfg.optim
    return lr_at(step, base_lr=o.lr, warmup_steps=o.warmup_steps, total_steps=cfg.run.steps,
                 schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)
