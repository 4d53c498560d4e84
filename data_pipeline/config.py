"""Settings of `python -m data_pipeline.shard` (YAML + `--set a.b=v`, via common.config.load_config).

Sections follow the pipeline's stages so a user finds a knob where the work happens. Only the
settings that change shard *content* enter the config hash (`content_settings`); worker counts,
devices and network patience do not, so a rerun with more workers resumes the same dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.captions import MAX_CAPTION_TOKENS, PRODUCTION_ENCODER
from common.config import ConfigError, to_dict


@dataclass
class ColumnsConfig:
    """Manifest column names; "" = auto-detect (ours: key,path,caption; WebVid: videoid,contentUrl,name;
    the others in docs/data_pipeline.md, "Manifests and columns")."""

    key: str = ""
    source: str = ""
    caption: str = ""  # one caption, or (with spans) a list of captions parallel to the spans
    spans: str = ""  # a list of [start, end] pairs (Panda-70M `timestamp`) or of clip records (HD-VILA `clip`)
    start: str = ""  # or one clip per row: its start and end columns (InternVid); auto-detected
    end: str = ""


@dataclass
class ClipConfig:
    """Clip geometry: T frames at `fps` (resampled by timestamps) or every `stride`-th frame."""

    frames: int = 16
    fps: float | None = 8.0  # target frames per second (ignored when stride is set)
    stride: int | None = None  # take every stride-th source frame; wins over fps when set
    height: int = 64
    width: int = 64
    clips_per_video: int = 1  # up to this many clips, spread evenly over long videos
    too_short: Literal["skip", "pad"] = "skip"  # pad repeats the last frame
    max_side: int = 4096  # refuse sources with a larger width or height (decode cost/memory bomb)
    max_duration_s: float = 3600.0  # refuse sources longer than this


@dataclass
class FilterConfig:
    """Clips left out of the shards on purpose, each a failure with its reason; 0 = that filter off.

    Off by default. The source checks (duration, size, aspect) run on the stream's metadata before
    a frame is decoded; the motion check runs on each decoded clip (data_pipeline.motion).
    """

    min_motion: float = 0.0  # static_clip: the clip's motion score (0..1, data_pipeline.motion) is below this
    min_duration_s: float = 0.0  # too_short: the source (or the span) lasts less than this many seconds
    min_side: int = 0  # too_small: the source's shorter side has fewer pixels than this
    max_aspect: float = 0.0  # bad_aspect: long side / short side as displayed is above this (e.g. 2.5)

    def active(self) -> dict:
        """The filters that are on (name → threshold): what enters the config hash."""
        return {k: v for k, v in vars(self).items() if v}


@dataclass
class StorageConfig:
    format: Literal["mp4", "npy"] = "mp4"  # mp4: small h264 (default); npy: raw uint8 [T,H,W,3]
    crf: int = 20  # h264 quality (lower = better, bigger)
    preset: str = "veryfast"


@dataclass
class EncoderConfig:
    """Caption → token embeddings (model.text_encoder.TextEncoder); loaded once per worker."""

    name_or_path: str = PRODUCTION_ENCODER
    device: str = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch_size: int = 32
    max_length: int = MAX_CAPTION_TOKENS
    threads: int = 1  # torch CPU threads per worker (0 = torch's default); scale with --workers instead


@dataclass
class FetchConfig:
    timeout_s: float = 30.0  # per socket operation (connect / each read)
    total_timeout_s: float = 300.0  # whole download, so a trickling server cannot hold a worker
    retries: int = 3  # extra attempts on timeouts, connection errors and HTTP 5xx/429 (never 4xx)
    backoff_s: float = 1.0  # wait backoff_s * 2**attempt between attempts
    max_bytes: int = 512 * 1024 * 1024
    allowed_schemes: list[str] = field(default_factory=lambda: ["file", "http", "https", "s3", "gs", "gcs"])


@dataclass
class SlurmConfig:
    partition: str | None = None
    nodes: int = 1  # array tasks run on one node each; `nodes` caps the array's parallelism
    time_min: int = 240
    cpus_per_task: int | None = None
    gpus_per_node: int = 0
    shards_per_task: int = 0  # 0 = spread shards evenly over array_tasks
    array_tasks: int = 16
    cluster: str = "slurm"  # submitit cluster: "slurm", or "local"/"debug" to run the array path here


@dataclass
class ShardConfig:
    manifest: str = ""
    manifest_format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"  # auto = from the suffix
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # what relative sources (OpenVid-1M's `abc_0.mp4`) are joined to: a directory (relative to the
    # working directory) or a URL / fsspec prefix (s3://bucket/openvid); "" = the manifest's own
    # directory. Absolute paths and URLs in the manifest are used as they are. Not in the config
    # hash (like the manifest's path): moving the clips does not change the shards.
    source_root: str = ""
    out_dir: str = "shards"
    # where the memory-mapped columnar copy of the manifest lives ("" = out_dir/.manifest); a
    # node-local directory (e.g. /tmp/manifest) gives one copy per node, made by its first task
    manifest_cache_dir: str = ""
    samples_per_shard: int = 1000  # manifest rows per shard (shard N = rows N*S .. (N+1)*S-1)
    clip: ClipConfig = field(default_factory=ClipConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    workers: int = 1  # local worker processes, each owning whole shards
    decode_threads: int = 1  # FFmpeg threads per decoder (0 = auto); workers already use the cores
    max_failure_ratio: float = 0.2  # exit non-zero when failed rows / rows exceeds this
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> ShardConfig:
        c = self.clip
        if not self.manifest:
            raise ConfigError("manifest: a manifest path is required (--manifest or manifest: in the YAML)")
        if self.source_root and "://" not in self.source_root and not Path(self.source_root).is_dir():
            raise ConfigError(f"source_root {self.source_root!r}: no such directory (relative sources in the "
                              f"manifest are joined to it; leave it empty for the manifest's directory)")
        if self.samples_per_shard < 1:
            raise ConfigError("samples_per_shard must be >= 1")
        if c.frames < 1 or c.height < 2 or c.width < 2:
            raise ConfigError("clip: frames >= 1, height/width >= 2 required")
        if c.stride is not None:
            c.fps = None  # stride wins: one timing rule per dataset, and the hash says which
            if c.stride < 1:
                raise ConfigError("clip.stride must be >= 1")
        elif c.fps is None or c.fps <= 0:
            raise ConfigError("clip: set clip.fps > 0 or clip.stride >= 1")
        if self.storage.format == "mp4" and (c.height % 2 or c.width % 2):
            raise ConfigError("clip: mp4 (yuv420p h264) needs even height and width; use npy or even sizes")
        if c.clips_per_video < 1:
            raise ConfigError("clip.clips_per_video must be >= 1")
        self._validate_filter()
        return self

    def _validate_filter(self) -> None:
        f = self.filter
        for name in ("min_motion", "min_duration_s", "min_side", "max_aspect"):
            if getattr(f, name) < 0:
                raise ConfigError(f"filter.{name} must be >= 0 (0 = off), got {getattr(f, name)}")
        if f.min_motion > 1:
            raise ConfigError(f"filter.min_motion is a score in [0, 1] (data_pipeline/motion.py), got {f.min_motion}")
        if f.min_motion and self.clip.frames < 2:
            raise ConfigError("filter.min_motion needs clip.frames >= 2 (motion is measured between frames)")
        if f.max_aspect and f.max_aspect < 1:
            raise ConfigError(f"filter.max_aspect is long side / short side, so >= 1 (or 0 = off), got {f.max_aspect}")


def manifest_cache_dir(cfg: ShardConfig) -> str:
    return cfg.manifest_cache_dir or str(Path(cfg.out_dir) / ".manifest")


def content_settings(cfg: ShardConfig) -> dict:
    """The settings that determine what a shard contains (the config hash covers exactly these)."""
    d = to_dict(cfg)
    return {
        # span columns enter only when set, so configs from before they existed keep their hash
        "columns": {k: v for k, v in d["columns"].items() if v or k in ("key", "source", "caption")},
        "samples_per_shard": d["samples_per_shard"],
        "clip": d["clip"],
        "storage": d["storage"] if cfg.storage.format == "mp4" else {"format": "npy"},
        "encoder": {k: d["encoder"][k] for k in ("name_or_path", "dtype", "max_length")},
        # filters that are on only, so configs from before they existed (all off) keep their hash
        **({"filter": cfg.filter.active()} if cfg.filter.active() else {}),
    }


def config_hash(cfg: ShardConfig) -> str:
    blob = json.dumps(content_settings(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
