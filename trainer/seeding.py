"""The training RNG streams: seeding them, and fencing work off from them.

Exact resume needs every draw of t, noise and caption dropout to happen at the same place in the
same stream as in an uninterrupted run, so whatever else runs in the loop (validation, sampling, the
loader starting its iterator, a FLOP count on a meta model) runs inside `preserved_rng()`.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from trainer import checkpoint as ckpt

# seed salts: offsets of run.seed for streams that must not coincide with the data order's or each other's
RANK_SEED_STRIDE = 1_000_003  # each rank's torch/numpy/random seed: run.seed + stride * (rank + 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank streams for t, noise and caption dropout (differ across ranks; a resume restores them)."""
    seed_everything(seed + RANK_SEED_STRIDE * (rank + 1))


@contextlib.contextmanager
def preserved_rng():
    """Validation and sampling must not shift the training RNG streams (exact resume)."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)
