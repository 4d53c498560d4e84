"""Sharding throughput vs the decode floor, and BERT-large caption embedding on CPU.

    .venv/bin/python -m bench.bench_shard                 # all cases, prints a JSON summary
    .venv/bin/python -m bench.bench_shard --n 12 --skip-bert

1. Demo-like videos: `--n` h264 files at 320x240, 24 fps, 2-6 s long: a camera pan over a
   random texture with a moving shape (decode cost like real footage; see data_pipeline.synthetic.textured_clip).
2. Floor: a bare PyAV loop that opens each file, decodes only the frames a clip needs (16 frames at
   8 fps = the first 2 s) and resizes them with one reused VideoReformatter — no fetch, no crop
   bookkeeping, no clip encode, no captions, no tar. Run in 1 and in 2 processes.
3. `data_pipeline.shard` with the tiny BERT encoder, 1 and 2 workers. Throughput counts from the
   first shard's start to the last shard's end (the shard JSONs' unix times), i.e. without the
   one-off interpreter/torch start-up; the wall time including start-up is reported too.
   Efficiency = shard videos/s / floor videos/s at the same process count (goal >= 0.7).
   CPU efficiency = floor CPU-ms per video / shard CPU-ms per video (the workers' process CPU
   time per shard, from the shard JSONs): the same ratio, but robust to other jobs on the cores.
4. Frame dropping A/B: `decode_clips` with and without dropping the frames no target picks,
   alternated video by video over 3 rounds in this process (CPU-ms per video, frames decoded).
5. BERT-large (hidden 1024, 24 layers, 16 heads, 4096 intermediate; random weights from
   BertConfig, no download) captions/s on CPU, batch 16, fp32 and bf16.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLIP_FRAMES, CLIP_FPS, SIZE = 16, 8.0, 64


def make_videos(d: Path, n: int) -> Path:
    """n textured h264 videos of 2, 3, 5 and 6 s (cycled) at 320x240, 24 fps + a manifest."""
    from common.mp4 import write_video
    from data_pipeline.synthetic import textured_clip, write_manifest

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        secs = (2, 3, 5, 6)[i % 4]
        path = d / f"v{i:04d}.mp4"
        write_video(path, textured_clip(rng, 24 * secs, 240, 320)[0], 24, crf="23", preset="veryfast")
        rows.append((f"v{i:04d}", str(path), f"a textured scene number {i} with a moving shape"))
    return Path(write_manifest(d / "manifest.csv", rows))


def _floor_one(path: str) -> int:
    import av
    import av.video.reformatter

    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        s.thread_count = 1
        reformatter = av.video.reformatter.VideoReformatter()
        end = CLIP_FRAMES / CLIP_FPS
        scale = SIZE / min(s.codec_context.width, s.codec_context.height)
        w, h = round(s.codec_context.width * scale), round(s.codec_context.height * scale)
        kept = 0
        for frame in c.decode(s):
            if frame.time is not None and frame.time >= end:
                break
            if kept < CLIP_FRAMES and frame.time * CLIP_FPS >= kept - 1e-6:  # the frames the clip keeps
                reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA",
                                     threads=1).to_ndarray()
                kept += 1
    return kept


def floor_cpu_ms(paths: list[str]) -> float:
    """CPU-ms per video of the bare loop (robust to other processes sharing the cores)."""
    _floor_one(paths[0])
    t = time.process_time()
    for p in paths:
        _floor_one(p)
    return 1000 * (time.process_time() - t) / len(paths)


def floor(paths: list[str], processes: int) -> float:
    if processes == 1:
        _floor_one(paths[0])  # warm
        t = time.perf_counter()
        for p in paths:
            _floor_one(p)
        return len(paths) / (time.perf_counter() - t)
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_floor_one, paths[:processes])  # warm the workers
        t = time.perf_counter()
        pool.map(_floor_one, paths, chunksize=1)
        return len(paths) / (time.perf_counter() - t)


def discard_ab(paths: list[str], rounds: int = 3) -> dict:
    """CPU-ms per video and frames decoded by decode_clips with/without dropping unneeded frames."""
    from data_pipeline.config import ClipConfig
    from data_pipeline.video import decode_clips

    cfg = ClipConfig(frames=CLIP_FRAMES, fps=CLIP_FPS, height=SIZE, width=SIZE)
    cpu = {True: 0.0, False: 0.0}
    decoded = {True: 0, False: 0}
    for _ in range(rounds):
        for p in paths:
            for flag in (False, True):
                t = time.process_time()
                info, _ = decode_clips(p, cfg, discard_unneeded=flag)
                cpu[flag] += time.process_time() - t
                decoded[flag] += info.frames_decoded
    n = rounds * len(paths)
    return {"cpu_ms_every_frame": 1000 * cpu[False] / n, "cpu_ms_dropping": 1000 * cpu[True] / n,
            "frames_every_frame": decoded[False] / n, "frames_dropping": decoded[True] / n,
            "cpu_ratio": cpu[True] / cpu[False]}


def shard(manifest: Path, out: Path, encoder: str, workers: int, fmt: str = "mp4") -> dict:
    cmd = [sys.executable, "-m", "data_pipeline.shard", "--manifest", str(manifest), "--out", str(out),
           "--encoder", encoder, "--workers", str(workers), "--no-progress",
           "--samples-per-shard", "6", "--set", f"clip.frames={CLIP_FRAMES}", "--set", f"clip.fps={CLIP_FPS}",
           "--set", f"clip.height={SIZE}", "--set", f"clip.width={SIZE}",
           "--set", f"storage.format={fmt}"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("shard-*.json"))]
    videos = sum(s["ok"] + s["failed"] for s in stats)
    span = max(s["finished"] for s in stats) - min(s["started"] for s in stats)
    return {"workers": workers, "format": fmt, "videos": videos, "failed": sum(s["failed"] for s in stats),
            "videos_per_s": videos / span, "wall_s_with_startup": wall,
            "cpu_ms_per_video": 1000 * sum(s["cpu_seconds"] for s in stats) / videos,
            "tar_mb": sum(p.stat().st_size for p in out.glob("*.tar")) / 1e6}


def bert_large(dtype: str, batches: int = 3, batch: int = 16) -> float:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from model.text_encoder import resolve_encoder_path

    tok = BertTokenizerFast.from_pretrained(resolve_encoder_path("minilm"))  # same uncased WordPiece vocab
    cfg = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    torch.manual_seed(0)
    model = BertModel(cfg).eval().to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    captions = [f"aerial shot of a {c} car driving along a coastal road at sunset, number {i}"
                for i, c in zip(range(batch), ["red", "blue", "white", "black"] * 4)]
    enc = tok(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        model(**enc)  # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            model(**enc).last_hidden_state.float()
        return batches * batch / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-bert", action="store_true")
    p.add_argument("--npy", action="store_true", help="also 1 worker with storage.format=npy")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "load_avg_at_start": os.getloadavg()[0], "n_videos": a.n,
                    "clip": f"{CLIP_FRAMES} frames @ {CLIP_FPS} fps, {SIZE}x{SIZE}"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_videos(tmp / "videos", a.n)
        paths = [r["path"] for r in csv.DictReader(open(manifest, encoding="utf-8"))]
        from testing.tiny_bert import make_tiny_bert

        tiny = make_tiny_bert(tmp / "tiny_bert")
        result["cases"] = []
        result["floor_cpu_ms_per_video"] = floor_cpu_ms(paths)
        result["discard_ab"] = discard_ab(paths)
        print(json.dumps(result["discard_ab"]), file=sys.stderr)
        for w in a.workers:
            fl = floor(paths, w)
            sh = shard(manifest, tmp / f"out{w}", tiny, w)
            sh.update(floor_videos_per_s=fl, floor_ms_per_video_per_process=1000 * w / fl,
                      efficiency=sh["videos_per_s"] / fl,
                      cpu_efficiency=result["floor_cpu_ms_per_video"] / sh["cpu_ms_per_video"])
            result["cases"].append(sh)
            print(json.dumps(sh), file=sys.stderr)
        if a.npy:  # the same without the h264 re-encode of the output clip
            sh = shard(manifest, tmp / "out_npy", tiny, 1, "npy")
            fl = floor(paths, 1)
            sh.update(floor_videos_per_s=fl, efficiency=sh["videos_per_s"] / fl,
                      cpu_efficiency=result["floor_cpu_ms_per_video"] / sh["cpu_ms_per_video"])
            result["cases"].append(sh)
    if not a.skip_bert:
        result["bert_large_cpu_captions_per_s"] = {d: bert_large(d) for d in ("fp32", "bf16")}
    result["load_avg_at_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
