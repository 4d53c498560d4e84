"""Measure the data side's unit costs on this machine, for the run planner (data_pipeline.capacity).

    python -m data_pipeline.calibrate --config configs/shard/webvid10m.yaml [--set k=v ...] \
        [--clips 64] [--encoder minilm] [--manifest videos.csv] [--image-frames 8] --out calibration.json

Why measure instead of estimate: shard size, sharding CPU and loader CPU depend on the clip geometry,
the h264 settings, the encoder, the codecs of the sources and the CPU, and a planner that guesses
them is wrong by the factor nobody checked. So this runs the project's real code on a small sample
at the config's geometry and writes per-unit costs:

- bytes per sample of the shards `data_pipeline.shard` writes (the tar files' size / samples), split
  into the video member (.mp4 or .frames.npy), the token embeddings (.emb.npy: float16 tokens x dim
  + its .npy header) and the rest (.txt, .json, tar headers and padding). The mean token count and
  the dim are recorded, so the planner rescales the embedding bytes to another encoder's width.
- shard CPU-seconds per video: the shard workers' process CPU time (the shard JSONs' `cpu_seconds`),
  split into the clip encode, the caption embedding, and everything else (fetch, decode, resize,
  motion score, metadata, tar), so a plan can leave the embedding out or put it on GPUs.
- loader CPU-seconds per sample: the training loader (`build_loader`, 0 workers so that all its work
  is this process's CPU time) reading those shards into batches, after its first batch.

Sources: synthetic videos (a camera pan over a random texture with a moving shape, which decodes and
compresses like footage; `--source-size`, `--source-fps`, `--source-seconds`), or the first
`--clips` rows of your own manifest (`--manifest`: real sources give the real decode cost).
Synthetic captions are ~12 BERT tokens; real ones may be longer (the planner takes `mean_tokens`).

Encoder: the config's, or `--encoder` (a stand-in when the configured one cannot be loaded here,
e.g. `minilm` for bert-large-uncased: the same uncased WordPiece vocabulary, so the same token
counts; the planner rescales the bytes by dim). Embedding CPU is that of the encoder that ran, on
the device it ran on (cuda when the config asks for it and a GPU is here, else cpu).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shlex
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common.config import ConfigError, load_config
from common.logs import setup_logging
from data_pipeline.config import ColumnsConfig, ShardConfig
from data_pipeline.manifest import ManifestError

CALIBRATION_VERSION = 1
DEFAULT_CLIPS = 64
DEFAULT_SOURCE = (320, 240)  # width x height of synthetic sources (decode cost as bench/bench_shard.py)
STAND_IN_NOTE = ("embedding bytes for {configured}: embedding.mean_tokens x its hidden dim x 2 (float16) + "
                 "embedding.npy_header_bytes (the token count holds for any encoder with the same tokenizer; "
                 "minilm's is the uncased WordPiece vocabulary of bert-base/large-uncased); shard_cpu_s_per_video.embed "
                 "is the stand-in's cost, not {configured}'s")
VIDEO_SUFFIXES = (".mp4", ".frames.npy")
EMB_SUFFIX = ".emb.npy"

log = logging.getLogger("data_pipeline.calibrate")


class CalibrationFailed(RuntimeError):
    """The measurement could not be made (no samples written, an encoder that does not load, ...)."""


# ------------------------------------------------------------------------------------------ inputs


def make_sources(out_dir: Path, n: int, width: int, height: int, fps: float, seconds: float, seed: int = 0) -> Path:
    """n textured synthetic h264 videos + manifest.csv (key,path,caption); returns the manifest."""
    import numpy as np

    from common.mp4 import write_video, x264_options
    from data_pipeline.synthetic import textured_clip, write_manifest

    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        frames, caption = textured_clip(rng, max(1, round(fps * seconds)), height, width)
        path = out_dir / "videos" / f"src{i:05d}.mp4"
        write_video(path, frames, fps, **x264_options(crf=23))
        rows.append((f"src{i:05d}", str(path.resolve()), caption))
    return Path(write_manifest(out_dir / "manifest.csv", rows))


def first_rows(manifest: str, n: int, cfg: ShardConfig, out_dir: Path) -> Path:
    """The first n rows of the user's manifest as a csv the sharder reads (same column mapping)."""
    from data_pipeline.manifest import Manifest

    m = Manifest(manifest, cfg.manifest_format, cfg.columns, cache_dir=str(out_dir / ".manifest-src"),
                 source_root=cfg.source_root)
    rows = m.shard_rows(0, n)
    if not rows:
        raise CalibrationFailed(f"--manifest {manifest}: no rows")
    if any(r.spans for r in rows):
        raise CalibrationFailed(f"--manifest {manifest}: rows with clip spans are not supported by calibrate yet; "
                                "pass a manifest with one clip per row")
    from data_pipeline.synthetic import write_manifest

    # sources come back already joined to the manifest's root, so the copy needs none
    return Path(write_manifest(out_dir / "manifest.csv", ((r.raw_key, r.source, r.caption or "") for r in rows)))


# ------------------------------------------------------------------------------------ measurements


def shard_bytes(shard_dir: Path) -> dict:
    """Sizes of the finished shards in `shard_dir`, per member kind, and the token counts of the
    stored embeddings (read with allow_pickle=False)."""
    from data_pipeline.decode import load_npy

    total = video = emb = samples = tokens = 0
    dims: set[int] = set()
    for tar_path in sorted(shard_dir.glob("shard-*.tar")):
        total += tar_path.stat().st_size
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(VIDEO_SUFFIXES):
                    video += member.size
                    samples += 1
                elif member.name.endswith(EMB_SUFFIX):
                    emb += member.size
                    arr = load_npy(tar.extractfile(member).read(), member.name)
                    tokens += arr.shape[0]
                    dims.add(int(arr.shape[1]))
    if samples == 0:
        raise CalibrationFailed(f"no samples were written to {shard_dir} (see the shard JSONs' failures)")
    if len(dims) != 1:
        raise CalibrationFailed(f"{shard_dir}: embeddings of several widths {sorted(dims)}")
    return {"samples": samples, "total": total, "video": video, "embedding": emb, "tokens": tokens,
            "dim": dims.pop()}


def shard_cpu(shard_dir: Path) -> dict:
    """CPU seconds summed over the shard JSONs, with the videos they attempted and wrote."""
    from data_pipeline.stats import read_stats

    keys = ("cpu_seconds", "encode_cpu_seconds", "embed_cpu_seconds", "embed_seconds", "items", "ok", "samples",
            "failed")
    sums = dict.fromkeys(keys, 0.0)
    for path in sorted(shard_dir.glob("shard-*.json")):
        st = read_stats(shard_dir, int(path.stem.split("-")[1]))
        if st is None:
            raise CalibrationFailed(f"{path}: unreadable shard stats")
        for k in keys:
            sums[k] += float(st.get(k, 0) or 0)
    return sums


def loader_cpu(shard_dir: Path, frames: int, size: int, image_frames: int, batch: int, samples: int) -> dict:
    """CPU seconds per sample of the training loader (0 workers: all of it in this process), timed from
    its first batch on over about one pass of the shards."""
    from data_pipeline.loader import build_loader
    from data_pipeline.loader_config import DataConfig

    batch = max(1, min(batch, samples // 2))
    cfg = DataConfig(shards=str(shard_dir), num_frames=frames, image_size=size, num_image_frames=image_frames,
                     batch_size=batch, num_workers=0, shuffle_buffer=min(64, samples))
    batches = max(1, samples // batch - 1)
    it = iter(build_loader(cfg))
    next(it)  # plan computation and first shard open: once per run, not per sample
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(it)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    n = batches * batch
    return {"cpu_s_per_sample": cpu / n, "wall_s_per_sample": wall / n, "samples_timed": n, "batch_size": batch,
            "image_frames": image_frames, "workers": 0}


def machine() -> dict:
    import av
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model, "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "av": av.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ------------------------------------------------------------------------------------------- driver


def _per(x: float, n: float) -> float:
    return x / n if n else 0.0


def calibrate(cfg: ShardConfig, work: Path, *, clips: int, manifest: str | None, source: tuple[int, int, float, float],
              workers: int, image_frames: int, loader_batch: int, configured_encoder: str) -> dict:
    """Shard `clips` videos with `cfg`'s geometry and encoder under `work`, read them back with the
    training loader, and return the calibration record (without the command/machine header)."""
    import torch

    from data_pipeline.shard import run

    t0 = time.perf_counter()
    if cfg.clip.height != cfg.clip.width:
        raise CalibrationFailed(f"clip {cfg.clip.height}x{cfg.clip.width}: the training loader reads square clips "
                                "(data.image_size); calibrate at a square geometry")
    if manifest:
        cfg.manifest = str(first_rows(manifest, clips, cfg, work))
        cfg.columns, cfg.manifest_format = ColumnsConfig(), "auto"  # the copy has our own key,path,caption columns
        src = {"kind": "manifest", "manifest": str(manifest), "videos": clips}
    else:
        w, h, fps, secs = source
        cfg.manifest = str(make_sources(work / "sources", clips, w, h, fps, secs))
        src = {"kind": "synthetic_textured", "videos": clips, "width": w, "height": h, "fps": fps, "seconds": secs}
    e = cfg.encoder
    if e.device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("encoder.device=%s but no GPU here: embedding on cpu", e.device)
        e.device = "cpu"
    cfg.out_dir = str(work / "shards")
    cfg.workers = workers
    cfg.samples_per_shard = max(1, math.ceil(clips / max(1, workers)))
    cfg.validate()
    summary = run(cfg, progress=False)
    if summary.missing_shards:
        raise CalibrationFailed(f"shards {summary.missing_shards} were not finished (see the log above)")
    shard_dir = Path(cfg.out_dir)
    b, cpu = shard_bytes(shard_dir), shard_cpu(shard_dir)
    n, videos = b["samples"], cpu["items"]
    c = cfg.clip
    loader = loader_cpu(shard_dir, c.frames, c.height, image_frames, loader_batch, n)
    other_cpu = cpu["cpu_seconds"] - cpu["encode_cpu_seconds"] - cpu["embed_cpu_seconds"]
    return {
        "geometry": {"frames": c.frames, "height": c.height, "width": c.width, "fps": c.fps, "stride": c.stride,
                     "clips_per_video": c.clips_per_video, "format": cfg.storage.format,
                     **({"crf": cfg.storage.crf, "preset": cfg.storage.preset} if cfg.storage.format == "mp4" else {})},
        "source": src,
        "encoder": {"name": e.name_or_path, "configured": configured_encoder,
                    "stand_in": e.name_or_path != configured_encoder, "dim": b["dim"], "dtype": e.dtype,
                    "device": e.device, "batch_size": e.batch_size,
                    **({"rescale": STAND_IN_NOTE.format(configured=configured_encoder)}
                       if e.name_or_path != configured_encoder else {})},
        "counts": {"videos": int(videos), "videos_ok": int(cpu["ok"]), "samples": n,
                   "shards": len(list(shard_dir.glob("shard-*.tar"))), "failed": int(cpu["failed"])},
        "samples_per_video": _per(n, videos),
        "bytes_per_sample": {"total": _per(b["total"], n), "video": _per(b["video"], n),
                             "embedding": _per(b["embedding"], n),
                             "other": _per(b["total"] - b["video"] - b["embedding"], n)},
        "embedding": {"mean_tokens": _per(b["tokens"], n), "dim": b["dim"], "bytes_per_value": 2,
                      "npy_header_bytes": _per(b["embedding"] - 2 * b["tokens"] * b["dim"], n)},
        "shard_cpu_s_per_video": {"total": _per(cpu["cpu_seconds"], videos), "decode": _per(other_cpu, videos),
                                  "encode": _per(cpu["encode_cpu_seconds"], videos),
                                  "embed": _per(cpu["embed_cpu_seconds"], videos)},
        "embed_wall_s_per_caption": _per(cpu["embed_seconds"], cpu["ok"]),
        "loader": loader,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 320x240, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"source size {text} is below 16x16")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="shard config (configs/shard/*.yaml): geometry, storage, encoder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a shard config field, e.g. --set clip.frames=9 (repeatable)")
    p.add_argument("--clips", type=int, default=DEFAULT_CLIPS, help=f"videos to shard (default {DEFAULT_CLIPS})")
    p.add_argument("--encoder", help="text encoder name or path to run instead of the config's (e.g. minilm, a "
                                     "stand-in for bert-large-uncased; the planner rescales by dim)")
    p.add_argument("--manifest", help="measure on the first --clips rows of this manifest instead of synthetic videos")
    p.add_argument("--source-size", type=_size, default=DEFAULT_SOURCE, metavar="WxH",
                   help="synthetic source size (default 320x240)")
    p.add_argument("--source-fps", type=float, default=24.0, help="synthetic source frame rate (default 24)")
    p.add_argument("--source-seconds", type=float, default=4.0, help="synthetic source length (default 4)")
    p.add_argument("--image-frames", type=int, default=0,
                   help="joint-training image frames per clip the loader adds (data.num_image_frames; default 0)")
    p.add_argument("--loader-batch", type=int, default=8, help="loader batch size (default 8)")
    p.add_argument("--workers", type=int, default=1, help="shard worker processes (default 1: in this process)")
    p.add_argument("--work-dir", help="keep the sources and shards here (default: a temporary directory, removed)")
    p.add_argument("--out", required=True, help="where to write the calibration JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    setup_logging(logging.INFO if args.verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.clips < 2:
        print("--clips must be >= 2 (the loader's first batch is not timed)", file=sys.stderr)
        return 2
    overrides = list(args.overrides) + (["encoder.name_or_path=" + args.encoder] if args.encoder else [])
    try:
        configured = load_config(ShardConfig, args.config, args.overrides).encoder.name_or_path
        cfg = load_config(ShardConfig, args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            record = calibrate(cfg, work, clips=args.clips, manifest=args.manifest,
                               source=(*args.source_size, args.source_fps, args.source_seconds), workers=args.workers,
                               image_frames=args.image_frames, loader_batch=args.loader_batch,
                               configured_encoder=configured)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            if "text encoder" not in str(e):
                raise
            print(f"{e}\n(no model hub here? pass --encoder minilm: a stand-in with the same uncased WordPiece "
                  "vocabulary; the planner rescales embedding bytes to the configured dim)", file=sys.stderr)
            return 2
        except ManifestError as e:
            print(f"manifest error: {e}", file=sys.stderr)
            return 2
        except CalibrationFailed as e:
            print(f"calibration failed: {e}", file=sys.stderr)
            return 1
    out = {"version": CALIBRATION_VERSION, "created_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": shlex.join(["python", "-m", "data_pipeline.calibrate", *argv]),
           "config": {"path": args.config, "overrides": args.overrides}, "machine": machine(), **record}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    from data_pipeline.capacity import calibration_lines, parse_calibration

    print("\n".join(calibration_lines(parse_calibration(out, args.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
