"""Loader throughput on demo-size shards: samples/s with 0 and 2 DataLoader workers.

    .venv/bin/python -m bench.bench_loader [--samples 384 --frames 16 --size 32 --batch 8 --out DIR]
    .venv/bin/python -m bench.bench_loader --shards demo_out/shards      # your own shards

Writes real shards first (h264 mp4 clips of moving shapes via data_pipeline.synthetic.render_clip and
common.mp4.encode_mp4, float16 [L, 384] caption embeddings, webdataset.TarWriter, index.json),
then times the loader in steady state: worker start-up and the first batch are excluded, since
training pays them once per run. The bare decode floor (one process decoding every clip with
data_pipeline.decode, no tar, no batching) is the reference the loader is measured against.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_demo_shards(out: Path, samples: int, per_shard: int, frames: int, size: int, fmt: str,
                      dim: int = 384, seed: int = 0) -> Path:
    import webdataset as wds

    from common.mp4 import encode_mp4
    from data_pipeline.synthetic import COLOURS, DIRECTIONS, SHAPES, render_clip

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    entries, i = [], 0
    while i < samples:
        name = f"shard-{len(entries):06d}.tar"
        count = min(per_shard, samples - i)
        with wds.TarWriter(str(out / name)) as sink:
            for _ in range(count):
                shape, colour, direction = (SHAPES[i % 3], list(COLOURS)[i % 4], list(DIRECTIONS)[(i // 4) % 4])
                clip = render_clip(shape, colour, direction, frames, size, size,
                                   (float(rng.uniform(0.2, 0.8) * size), float(rng.uniform(0.2, 0.8) * size)))
                caption = f"a {colour} {shape} moving {direction}"
                emb = rng.standard_normal((len(caption.split()) + 2, dim)).astype(np.float16)
                sample = {"__key__": f"vid{i:06d}", "txt": caption, "emb.npy": _npy(emb), "json": json.dumps({})}
                if fmt == "mp4":
                    sample["mp4"] = encode_mp4(clip, fps=8)
                else:
                    sample["frames.npy"] = _npy(clip)
                sink.write(sample)
                i += 1
        entries.append({"name": name, "count": count})
    index = {"version": 1, "shards": entries, "total": samples, "encoder": {"name": "bench", "dim": dim},
             "clip": {"frames": frames, "height": size, "width": size, "fps": 8.0, "stride": None},
             "format": fmt, "config_hash": "bench"}
    (out / "index.json").write_text(json.dumps(index))
    return out


def time_loader(shards: Path, *, workers: int, batch: int, frames: int, size: int, image_frames: int,
                n_batches: int) -> tuple[float, float, float, float | None]:
    """(steady-state samples/s, s to the first batch, s to the first batch after a resume, CPU ms/sample).

    CPU ms per sample (this process's CPU time, so only with 0 workers) does not depend on how
    busy the machine is, unlike samples/s on a shared machine.

    The clock for samples/s starts after the first batch arrives. The resume figure is a fresh
    loader restored to the position after the timed batches (it skips, without decoding, what the
    first loader consumed) until its first batch.
    """
    from data_pipeline.loader import build_loader
    from data_pipeline.loader_config import DataConfig

    cfg = DataConfig(shards=str(shards), batch_size=batch, num_workers=workers, shuffle_buffer=64,
                     num_frames=frames, image_size=size, num_image_frames=image_frames)
    t_start = time.perf_counter()
    loader = build_loader(cfg)
    it = iter(loader)
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        next(it)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it
    state = loader.state_dict()
    t_resume = time.perf_counter()
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    next(iter(resumed))
    cpu_ms = 1000 * cpu / (n_batches * batch) if workers == 0 else None
    return n_batches * batch / dt, t0 - t_start, time.perf_counter() - t_resume, cpu_ms


def time_bare_decode(shards: Path, frames: int, size: int) -> tuple[float, float]:
    """(samples/s, CPU ms/sample) of decode_sample alone over the raw samples (read into memory first)."""
    from data_pipeline.decode import decode_sample
    from data_pipeline.index import read_index
    from data_pipeline.loader import read_shard

    raws = [raw for entry in read_index(shards).shards for raw in read_shard(entry.url)]
    t0, c0 = time.perf_counter(), time.process_time()
    for raw in raws:
        decode_sample(raw, frames=frames, height=size, width=size, max_text_len=77)
    return len(raws) / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / len(raws)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=384)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=40, help="timed batches per configuration")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--formats", nargs="+", default=["mp4", "npy"])
    p.add_argument("--out", default="", help="where to write the demo shards (default: a temporary directory)")
    p.add_argument("--shards", default="", help="benchmark this existing shard directory instead")
    a = p.parse_args(argv)

    from data_pipeline.index import read_index

    targets = []  # (label, directory, frames, size)
    if a.shards:
        index = read_index(a.shards)
        if index.height != index.width:
            raise SystemExit(f"{a.shards}: the loader needs square clips, index has {index.height}x{index.width}")
        targets.append((index.format, Path(a.shards), index.frames, index.height))
    else:
        root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench_loader_"))
        for fmt in a.formats:
            if not (root / fmt / "index.json").exists():
                write_demo_shards(root / fmt, a.samples, a.per_shard, a.frames, a.size, fmt)
            targets.append((fmt, root / fmt, a.frames, a.size))
    load_before = os.getloadavg()[0]
    rows = []
    for fmt, shards, frames, size in targets:
        size_mb = sum(f.stat().st_size for f in shards.glob("*.tar")) / 1e6
        floor, floor_cpu = time_bare_decode(shards, frames, size)
        rows.append((fmt, "bare decode (1 process, no tar/batching)", floor, None, None, floor_cpu, size_mb))
        print(f"{fmt:4s} bare decode: {floor:8.1f} samples/s", flush=True)
        for workers in a.workers:
            for k in (0, 4):
                sps, first, resume, cpu = time_loader(shards, workers=workers, batch=a.batch, frames=frames,
                                                      size=size, image_frames=k, n_batches=a.batches)
                rows.append((fmt, f"loader, {workers} workers, K={k} image frames", sps, first, resume, cpu, size_mb))
                print(f"{fmt:4s} workers={workers} K={k}: {sps:8.1f} samples/s, first batch {first:.2f} s, "
                      f"after resume {resume:.2f} s", flush=True)

    what = a.shards or f"{a.samples} samples of {a.frames}x{a.size}x{a.size} in shards of {a.per_shard}"
    print(f"\n{what}, batch {a.batch}, {a.batches} timed batches, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), load average {load_before:.1f} → {os.getloadavg()[0]:.1f}")
    print("| format | what | samples/s | CPU ms/sample | first batch (s) | first batch after resume (s) | shards MB |")
    print("|---|---|---|---|---|---|---|")
    for fmt, what, sps, first, resume, cpu, mb in rows:
        f = "" if first is None else f"{first:.2f}"
        r = "" if resume is None else f"{resume:.2f}"
        c = "" if cpu is None else f"{cpu:.2f}"
        print(f"| {fmt} | {what} | {sps:.1f} | {c} | {f} | {r} | {mb:.2f} |")


if __name__ == "__main__":
    main()
