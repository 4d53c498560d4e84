"""The precision names of configs (`run.precision`, the text encoder's dtype) → torch dtypes: the one map."""

from __future__ import annotations

import torch

PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype a precision name stands for (parameters, a text encoder's weights)."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {sorted(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast compute dtype for a precision (None = plain fp32, no autocast)."""
    dtype = precision_dtype(precision)
    return None if dtype == torch.float32 else dtype
