"""Dataset storage, sharding time and loader cores of a planned run, from measured unit costs.

    cal = load_calibration(None)                      # the shipped default, or a path to your own
    plan = plan_data(cal, videos=10_000_000, frames=16, height=64, width=64, text_dim=1024,
                     clips_per_s_per_gpu=40.0, gpus=64, shard_nodes=16, shard_cores_per_node=32)
    print("\\n".join(plan.lines())); json.dumps(plan.as_dict())

The unit costs come from `python -m data_pipeline.calibrate` (the project's real sharder and loader
on a sample of clips, on the user's machine); this module only does arithmetic on them, so a plan
costs nothing and every figure says where it came from (`DataPlan.sources`).

When the plan's clip geometry differs from the calibration's, the figures are scaled, and `sources`
says by what. The assumptions:
- mp4 video bytes scale with pixels (frames x H x W): h264 at a fixed CRF spends about the same bits
  per pixel on the same kind of content. npy video bytes are computed exactly (T x H x W x 3 + header).
- Embedding bytes are exact given the token count: mean tokens x text_dim x 2 (float16) + the .npy
  header. The token count is the calibration's (its captions) unless `mean_tokens` is given.
- Shard CPU: the clip encode scales with pixels; the rest of a video's work (fetch, decode of the
  source at its own resolution, resize, motion score, tar) with the clip's frames only, since the
  stretch of source decoded grows with the frames and not with the output size.
- Loader CPU scales with pixels: its work is decoding the clip and converting every pixel.
- The tar overhead (.txt, .json, member headers) does not depend on the geometry.
Measured at the calibration's geometry, no figure is scaled. A calibration in one clip format
(mp4/npy) does not plan the other: decode, encode and loader costs differ by factors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

CALIBRATION_VERSION = 1
DEFAULT_CALIBRATION = Path(__file__).with_name("calibration_default.json")
NPY_HEADER_BYTES = 128  # numpy's format-1.0 header for a plain uint8/float16 array (padded to 64-byte blocks)
EMBED_BYTES_PER_VALUE = 2  # float16
# Loader cores a GPU gets = measured need x this, rounded up. The calibration reads page-cached local
# shards in the trainer's own process; in a run the shards come over the network or from disk, batches
# cross from worker processes to the trainer, the trainer's Python needs a core of its own, and a
# loader running at exactly its need cannot catch up after one slow shard (every rank then waits).
LOADER_HEADROOM = 1.5


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Calibration:
    """Per-unit costs measured by data_pipeline.calibrate (per sample, per video, per caption)."""

    path: str
    created: str
    machine: str  # one line: CPU model, cores, torch and av versions
    frames: int
    height: int
    width: int
    clip_format: str  # mp4 | npy
    video_bytes: float  # per sample: the .mp4 / .frames.npy member
    embedding_bytes: float  # per sample: the .emb.npy member
    other_bytes: float  # per sample: .txt, .json, tar headers and padding
    mean_tokens: float  # caption tokens per sample (embedding rows)
    embed_dim: int  # width of the embeddings measured
    npy_header_bytes: float  # per .emb.npy member
    samples_per_video: float  # clips written per manifest row (failures and clips_per_video)
    shard_decode_cpu_s: float  # per video: fetch, decode, resize, motion, metadata, tar
    shard_encode_cpu_s: float  # per video: the clip encode (h264 or .npy)
    shard_embed_cpu_s: float  # per video: caption embedding (CPU side only when it ran on a GPU)
    encoder: str  # the encoder that ran
    configured_encoder: str  # the one the shard config names (differs for a stand-in)
    encoder_device: str
    loader_cpu_s_per_sample: float
    loader_image_frames: int
    source: str  # what was sharded (synthetic textured 320x240 ..., or a manifest)

    @property
    def pixels(self) -> int:
        return self.frames * self.height * self.width

    @property
    def geometry(self) -> str:
        return f"{self.frames}x{self.height}x{self.width} {self.clip_format}"


def _field(data: dict, dotted: str, where: str, kind: type = float, minimum: float = 0.0):
    cur = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise CalibrationError(f"{where}: field {dotted!r} is missing (rerun python -m data_pipeline.calibrate)")
        cur = cur[part]
    if kind is str:
        if not isinstance(cur, str) or not cur:
            raise CalibrationError(f"{where}: field {dotted!r} must be a non-empty string, got {cur!r}")
        return cur
    if isinstance(cur, bool) or not isinstance(cur, (int, float)) or not math.isfinite(cur) or cur < minimum:
        raise CalibrationError(f"{where}: field {dotted!r} must be a number >= {minimum:g}, got {cur!r}")
    if kind is int:
        if cur != int(cur):
            raise CalibrationError(f"{where}: field {dotted!r} must be a whole number, got {cur!r}")
        return int(cur)
    return float(cur)


def _machine_line(m: dict) -> str:
    if not isinstance(m, dict):
        return "unknown machine"
    return (f"{m.get('cpu_model', '?')}, {m.get('usable_cores', m.get('cpu_count', '?'))} cores, "
            f"torch {m.get('torch', '?')}, av {m.get('av', '?')}" + (f", GPU {m['gpu']}" if m.get("gpu") else ""))


def _source_line(s: dict) -> str:
    if not isinstance(s, dict):
        return "unknown source"
    if s.get("kind") == "manifest":
        return f"{s.get('videos', '?')} rows of {s.get('manifest', '?')}"
    return (f"{s.get('videos', '?')} synthetic textured videos, {s.get('width', '?')}x{s.get('height', '?')} "
            f"at {s.get('fps', '?')} fps, {s.get('seconds', '?')} s")


def parse_calibration(data: dict, where: str) -> Calibration:
    """A calibration record (the JSON data_pipeline.calibrate writes) → Calibration; `where` names
    the file in errors."""
    if not isinstance(data, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = _field(data, "version", where, int, 1)
    if version != CALIBRATION_VERSION:
        raise CalibrationError(f"{where}: field 'version' is {version}; this planner reads version "
                               f"{CALIBRATION_VERSION} (rerun python -m data_pipeline.calibrate)")
    fmt = _field(data, "geometry.format", where, str)
    if fmt not in ("mp4", "npy"):
        raise CalibrationError(f"{where}: field 'geometry.format' must be 'mp4' or 'npy', got {fmt!r}")
    return Calibration(
        path=where, created=str(data.get("created_utc", "?")), machine=_machine_line(data.get("machine")),
        frames=_field(data, "geometry.frames", where, int, 1), height=_field(data, "geometry.height", where, int, 1),
        width=_field(data, "geometry.width", where, int, 1), clip_format=fmt,
        video_bytes=_field(data, "bytes_per_sample.video", where),
        embedding_bytes=_field(data, "bytes_per_sample.embedding", where),
        other_bytes=_field(data, "bytes_per_sample.other", where),
        mean_tokens=_field(data, "embedding.mean_tokens", where),
        embed_dim=_field(data, "embedding.dim", where, int, 1),
        npy_header_bytes=_field(data, "embedding.npy_header_bytes", where),
        samples_per_video=_field(data, "samples_per_video", where),
        shard_decode_cpu_s=_field(data, "shard_cpu_s_per_video.decode", where),
        shard_encode_cpu_s=_field(data, "shard_cpu_s_per_video.encode", where),
        shard_embed_cpu_s=_field(data, "shard_cpu_s_per_video.embed", where),
        encoder=_field(data, "encoder.name", where, str), configured_encoder=_field(data, "encoder.configured", where, str),
        encoder_device=_field(data, "encoder.device", where, str),
        loader_cpu_s_per_sample=_field(data, "loader.cpu_s_per_sample", where),
        loader_image_frames=_field(data, "loader.image_frames", where, int),
        source=_source_line(data.get("source")),
    )


def load_calibration(path: str | Path | None = None) -> Calibration:
    """The calibration JSON at `path`; None = the shipped default (data_pipeline/calibration_default.json)."""
    p = Path(path) if path is not None else DEFAULT_CALIBRATION
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise CalibrationError(f"{p}: cannot read the calibration ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CalibrationError(f"{p}: not valid JSON ({e})") from None
    return parse_calibration(data, str(p))


def calibration_lines(cal: Calibration) -> list[str]:
    """A human summary of a calibration (what data_pipeline.calibrate prints)."""
    per_video = cal.shard_decode_cpu_s + cal.shard_encode_cpu_s + cal.shard_embed_cpu_s
    total = cal.video_bytes + cal.embedding_bytes + cal.other_bytes
    return [
        f"calibration {cal.path} ({cal.created}; {cal.machine})",
        f"  clips {cal.geometry}, from {cal.source}",
        f"  bytes/sample {total:,.0f} = video {cal.video_bytes:,.0f} + embedding {cal.embedding_bytes:,.0f} "
        f"({cal.mean_tokens:.1f} tokens x {cal.embed_dim}-d, {cal.encoder}) + other {cal.other_bytes:,.0f}",
        f"  shard CPU/video {1000 * per_video:.2f} ms = decode etc. {1000 * cal.shard_decode_cpu_s:.2f} + encode "
        f"{1000 * cal.shard_encode_cpu_s:.2f} + embed {1000 * cal.shard_embed_cpu_s:.2f} ({cal.encoder_device})",
        f"  loader CPU/sample {1000 * cal.loader_cpu_s_per_sample:.2f} ms "
        f"({cal.loader_image_frames} joint image frames per clip)",
    ]


@dataclass(frozen=True)
class DataPlan:
    """The data side of a run. Bytes are decimal (1 GB = 1e9 B); hours are CPU-, GPU- or wall-hours as
    named. `shard_embed_gpu_hours` is None when the embedding is planned on the shard nodes' CPUs."""

    videos: int
    samples: float
    frames: int
    height: int
    width: int
    clip_format: str
    text_dim: int
    mean_tokens: float
    bytes_per_sample_video: float
    bytes_per_sample_embedding: float
    bytes_per_sample_other: float
    bytes_per_sample: float
    dataset_bytes_video: float
    dataset_bytes_embedding: float
    dataset_bytes_other: float
    dataset_bytes: float
    shard_nodes: int
    shard_cores_per_node: int
    shard_gpus_per_node: int
    shard_clip_cpu_hours: float  # decode + encode + tar, all videos
    shard_embed_cpu_hours: float  # caption embedding on CPU (0 when planned on GPUs)
    shard_embed_gpu_hours: float | None
    shard_cpu_hours: float  # clip + embedding CPU-hours
    shard_wall_hours: float  # on shard_nodes x shard_cores_per_node (and their GPUs for the embedding)
    gpus: int
    clips_per_s_per_gpu: float
    loader_cpu_s_per_sample: float
    loader_cores_per_gpu: float  # the measured need at the planned rate, no headroom
    loader_headroom: float
    loader_workers_per_gpu: int  # ceil(need x headroom): data.num_workers and the cores to reserve
    loader_cores_total: int
    calibration: str  # file, date and machine of the unit costs
    sources: dict  # figure → "measured ..." / "scaled ..." / "computed ..." / "given ..."

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        def tb(b: float) -> str:
            return f"{b / 1e12:,.2f} TB" if b >= 1e11 else f"{b / 1e9:,.2f} GB"

        embed = (f"{self.shard_embed_gpu_hours:,.1f} GPU-h embedding" if self.shard_embed_gpu_hours is not None
                 else f"{self.shard_embed_cpu_hours:,.1f} CPU-h embedding")
        gpus = f" + {self.shard_gpus_per_node} GPU" if self.shard_embed_gpu_hours is not None else ""
        out = [
            f"Data: {self.videos:,} videos → {self.samples:,.0f} clips of {self.frames}x{self.height}x{self.width} "
            f"{self.clip_format}, {self.text_dim}-d token embeddings ({self.mean_tokens:.1f} tokens/caption)",
            f"  storage   {tb(self.dataset_bytes)} = video {tb(self.dataset_bytes_video)} + embeddings "
            f"{tb(self.dataset_bytes_embedding)} + other {tb(self.dataset_bytes_other)} "
            f"({self.bytes_per_sample / 1e3:,.1f} KB/clip)",
            f"  sharding  {self.shard_clip_cpu_hours:,.1f} CPU-h clips + {embed} → {self.shard_wall_hours:,.2f} h wall "
            f"on {self.shard_nodes} nodes x ({self.shard_cores_per_node} cores{gpus}), downloads not included",
            f"  loader    {self.loader_cores_per_gpu:.2f} cores/GPU at {self.clips_per_s_per_gpu:,.1f} clips/s/GPU → "
            f"{self.loader_workers_per_gpu} loader workers (cores) per GPU with {self.loader_headroom:g}x headroom, "
            f"{self.loader_cores_total:,} in all",
            f"  unit costs: {self.calibration}",
        ]
        out += [f"    {k}: {v}" for k, v in self.sources.items()]
        return out


def _positive(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"plan_data: {name} must be a number > 0, got {v!r}")


def plan_data(cal: Calibration, *, videos: int, frames: int, height: int, width: int, text_dim: int,
              clips_per_s_per_gpu: float, gpus: int, shard_nodes: int, shard_cores_per_node: int,
              clip_format: str | None = None, mean_tokens: float | None = None, shard_gpus_per_node: int = 1,
              embed_captions_per_s_per_gpu: float | None = None) -> DataPlan:
    """Storage, sharding time and loader cores for `videos` manifest rows at this clip geometry.

    clip_format None = the calibration's. mean_tokens None = the calibration's captions. With
    `embed_captions_per_s_per_gpu` the caption embedding runs on the shard nodes' GPUs
    (`shard_gpus_per_node` each) at that rate; without it, on their CPUs at the calibration's cost.
    Sharding wall time assumes one worker per core and shards spread evenly (they are independent),
    CPU and GPU work of different workers overlapping; fetching the sources is not included.
    """
    _positive(videos=videos, frames=frames, height=height, width=width, text_dim=text_dim,
              clips_per_s_per_gpu=clips_per_s_per_gpu, gpus=gpus, shard_nodes=shard_nodes,
              shard_cores_per_node=shard_cores_per_node)
    fmt = clip_format or cal.clip_format
    if fmt != cal.clip_format:
        raise ValueError(f"plan_data: clip_format {fmt!r}, but {cal.path} measured {cal.clip_format!r} clips (their "
                         f"encode, decode and loader costs differ); rerun python -m data_pipeline.calibrate with "
                         f"--set storage.format={fmt}")
    tokens = cal.mean_tokens if mean_tokens is None else mean_tokens
    if mean_tokens is not None:
        _positive(mean_tokens=mean_tokens)
    if embed_captions_per_s_per_gpu is not None:
        _positive(embed_captions_per_s_per_gpu=embed_captions_per_s_per_gpu, shard_gpus_per_node=shard_gpus_per_node)

    here = f"{frames}x{height}x{width}"
    same = (frames, height, width) == (cal.frames, cal.height, cal.width)
    px = frames * height * width / cal.pixels
    t = frames / cal.frames
    calibrated = f"{cal.frames}x{cal.height}x{cal.width}"
    measured = f"measured at {calibrated}"
    sources: dict[str, str] = {}

    if same:
        video = cal.video_bytes
        sources["video_bytes"] = measured
    elif fmt == "npy":
        video = frames * height * width * 3 + NPY_HEADER_BYTES
        sources["video_bytes"] = f"computed: uint8 {here}x3 + {NPY_HEADER_BYTES} B .npy header"
    else:
        video = cal.video_bytes * px
        sources["video_bytes"] = f"scaled by pixels x{px:.3g} from {cal.video_bytes:,.0f} B {measured}"

    embedding = tokens * text_dim * EMBED_BYTES_PER_VALUE + cal.npy_header_bytes
    if text_dim == cal.embed_dim and mean_tokens is None:
        sources["embedding_bytes"] = f"measured ({cal.encoder}, {cal.embed_dim}-d, {cal.mean_tokens:.1f} tokens)"
    else:
        tok = (f"{tokens:.1f} tokens given" if mean_tokens is not None
               else f"{cal.mean_tokens:.1f} tokens measured with {cal.encoder}")
        sources["embedding_bytes"] = (f"computed: {tok} x {text_dim}-d x {EMBED_BYTES_PER_VALUE} B + .npy header "
                                      f"(measured {cal.embed_dim}-d)")
    other = cal.other_bytes
    sources["other_bytes"] = f"{measured} (.txt, .json, tar headers; independent of geometry)"
    samples = videos * cal.samples_per_video
    sources["samples"] = f"{measured}: {cal.samples_per_video:.3g} clips per video"

    decode_s, encode_s = cal.shard_decode_cpu_s * t, cal.shard_encode_cpu_s * px
    clip_cpu_h = videos * (decode_s + encode_s) / 3600
    sources["shard_clip_cpu"] = measured if same else (
        f"scaled from {calibrated}: decode etc. by frames x{t:.3g}, clip encode by pixels x{px:.3g}")
    cores = shard_nodes * shard_cores_per_node
    if embed_captions_per_s_per_gpu is None:
        embed_cpu_h, embed_gpu_h = videos * cal.shard_embed_cpu_s / 3600, None
        note = f"measured on {cal.encoder_device} with {cal.encoder} ({cal.embed_dim}-d)"
        if cal.encoder != cal.configured_encoder or cal.embed_dim != text_dim:
            note += (f": a stand-in, the {text_dim}-d {cal.configured_encoder} costs more per caption; plan it on "
                     "GPUs with embed_captions_per_s_per_gpu")
        sources["shard_embed"] = note
        wall = (clip_cpu_h + embed_cpu_h) / cores
    else:
        embed_cpu_h, embed_gpu_h = 0.0, videos / embed_captions_per_s_per_gpu / 3600
        sources["shard_embed"] = f"given: {embed_captions_per_s_per_gpu:g} captions/s per GPU"
        wall = max(clip_cpu_h / cores, embed_gpu_h / (shard_nodes * shard_gpus_per_node))

    loader_s = cal.loader_cpu_s_per_sample * px
    need = clips_per_s_per_gpu * loader_s
    workers = max(1, math.ceil(need * LOADER_HEADROOM - 1e-9))
    sources["loader_cpu"] = (measured if same else f"scaled by pixels x{px:.3g} from {calibrated}") + (
        f", 0 workers, {cal.loader_image_frames} joint image frames per clip")

    return DataPlan(
        videos=int(videos), samples=samples, frames=frames, height=height, width=width, clip_format=fmt,
        text_dim=text_dim, mean_tokens=tokens,
        bytes_per_sample_video=video, bytes_per_sample_embedding=embedding, bytes_per_sample_other=other,
        bytes_per_sample=video + embedding + other,
        dataset_bytes_video=samples * video, dataset_bytes_embedding=samples * embedding,
        dataset_bytes_other=samples * other, dataset_bytes=samples * (video + embedding + other),
        shard_nodes=shard_nodes, shard_cores_per_node=shard_cores_per_node, shard_gpus_per_node=shard_gpus_per_node,
        shard_clip_cpu_hours=clip_cpu_h, shard_embed_cpu_hours=embed_cpu_h, shard_embed_gpu_hours=embed_gpu_h,
        shard_cpu_hours=clip_cpu_h + embed_cpu_h, shard_wall_hours=wall,
        gpus=gpus, clips_per_s_per_gpu=clips_per_s_per_gpu, loader_cpu_s_per_sample=loader_s,
        loader_cores_per_gpu=need, loader_headroom=LOADER_HEADROOM, loader_workers_per_gpu=workers,
        loader_cores_total=workers * gpus,
        calibration=f"{cal.path} ({cal.created}; {cal.machine}; {cal.source})", sources=sources,
    )
