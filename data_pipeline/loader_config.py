"""The `data:` section of the training config: what `data_pipeline.loader.build_loader` reads.

Next to the loader it configures rather than in the trainer, so the loader takes it typed and a
tool that only streams shards needs nothing from trainer/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.captions import MAX_CAPTION_TOKENS


@dataclass
class DownloadConfig:
    """Patience with remote shards (http(s), fsspec URLs, pipe: commands): each shard is downloaded
    whole before it is read, retried with exponential backoff, and skipped (logged, counted in
    `loader.skipped_shards`) when every attempt failed, so a dead or hanging server costs bounded
    time, never the run. Local files are opened directly, without retries."""

    attempts: int = 5  # tries per shard (1 = no retry); HTTP 4xx other than 408/429 is not retried
    backoff_s: float = 1.0  # wait backoff_s * 2**(try - 1), +-25 % jitter, between tries
    max_backoff_s: float = 60.0  # cap on one wait
    timeout_s: float = 60.0  # per request and socket read: a server that stops answering fails the try
    total_timeout_s: float = 1800.0  # one try's whole download (a trickling server; a pipe: command's run time)
    spool_mb: int = 64  # a downloaded shard up to this size stays in memory, a larger one in a temp file


@dataclass
class DataConfig:
    """Where training clips come from and how batches are formed (data_pipeline.loader)."""

    # shards: a directory with index.json (local or URL: s3://b/shards, http://host/shards), a brace
    # pattern (/data/shard-{000000..000099}.tar, https://host/shard-{0000..0099}.tar), several joined
    # by "::", or pipe: commands (pipe:curl -s http://host/shard-{0000..0099}.tar); docs/loader.md
    shards: str = ""
    val_shards: str = ""  # held-out shards for validation loss ("" = none), same forms
    # index.json giving the sample counts of a pattern's shards ("" = index.json next to the shards);
    # any form above (path, URL, or pipe: command)
    index: str = ""
    val_index: str = ""
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
    max_text_len: int = MAX_CAPTION_TOKENS  # captions' token embeddings are cut to this many tokens
    seed: int = 0
    # skip clips whose stored motion score ({key}.json "motion", data_pipeline.motion) is below this
    # (0 = off); reads only the JSON, so no re-sharding; skipped clips are counted (filtered_samples)
    min_motion: float = 0.0
    prefetch_factor: int = 2  # batches each loader worker prepares ahead
    # how loader workers start: forkserver/spawn never fork a process that holds PyAV/FFmpeg state
    worker_start_method: Literal["forkserver", "spawn", "fork"] = "forkserver"
    download: DownloadConfig = field(default_factory=DownloadConfig)  # remote shards: retries, timeouts
