"""The `data:` section of the training config: what `data_pipeline.loader.build_loader` reads.

Next to the loader it configures rather than in the trainer, so the loader takes it typed and a
tool that only streams shards needs nothing from trainer/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Where training clips come from and how batches are formed (data_pipeline.loader)."""

    shards: str = ""  # directory holding shard-*.tar and index.json
    val_shards: str = ""  # held-out shards for validation loss ("" = none)
    batch_size: int = 1  # per rank, per micro-step
    num_workers: int = 2
    shuffle_buffer: int = 256  # per canonical stream, in samples (0/1 = shard order only)
    # canonical streams of the global sample sequence: 0 = the global batch size (batch_size x world
    # size x grad_accum); else a multiple of it, fixed so a changed global batch size continues exactly
    streams: int = 0
    num_frames: int = 16  # T video frames per clip (must match the shards)
    image_size: int = 64  # H = W (must match the shards)
    num_image_frames: int = 0  # K independent image frames appended to each clip (paper 4.3.1)
    encoder: str = ""  # text encoder the shards must have been made with ("" = accept any)
    max_text_len: int = 77  # captions' token embeddings are cut to this many tokens
    seed: int = 0
    # skip clips whose stored motion score ({key}.json "motion", data_pipeline.motion) is below this
    # (0 = off); reads only the JSON, so no re-sharding; skipped clips are counted (filtered_samples)
    min_motion: float = 0.0
    prefetch_factor: int = 2  # batches each loader worker prepares ahead
    # how loader workers start: forkserver/spawn never fork a process that holds PyAV/FFmpeg state
    worker_start_method: Literal["forkserver", "spawn", "fork"] = "forkserver"
