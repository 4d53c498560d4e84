"""mkdata.py OUT [--dirs left,right] [--travel 0.3] [--n 64] [--frames 8]: the reduced datasets of
docs/motion.md (E1, E2, 4 directions): clips of exactly --frames frames at 32 px moving only in --dirs,
sharded with the demo's shard config into OUT/shards and OUT/val_shards (16 held-out clips).
DIR_ONLY=1 captions them "moving {d}" only.
"""

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.mp4 import write_video  # noqa: E402
from data_pipeline.synthetic import COLOURS, SHAPES, inside_start, render_clip  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--dirs", default="left,right,up,down")
    p.add_argument("--travel", type=float, default=0.3)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--frames", type=int, default=8)
    a = p.parse_args()
    out, dirs = Path(a.out).resolve(), a.dirs.split(",")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    for prefix, n, seed in (("", a.n, 0), ("val_", 16, 12345)):
        videos = out / f"{prefix}videos"
        videos.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        rows = []
        for i in range(n):
            shape = SHAPES[int(rng.integers(3))]
            colour = list(COLOURS)[int(rng.integers(4))]
            d = dirs[int(rng.integers(len(dirs)))]
            path = videos / f"v{i:04d}.mp4"
            clip = render_clip(shape, colour, d, a.frames, 32, 32, inside_start(rng, d, 32, 32, a.travel), travel=a.travel)
            write_video(path, clip, 8, crf="20", preset="veryfast", threads="1",
                        **{"x264-params": "sync-lookahead=0:mbtree=0"})
            caption = f"moving {d}" if os.environ.get("DIR_ONLY") else f"a {colour} {shape} moving {d}"
            rows.append((path.stem, str(path), caption))
        with open(videos / "manifest.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "path", "caption"])
            w.writerows(rows)
        subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", "configs/shard/demo.yaml",
                        "--manifest", str(videos / "manifest.csv"), "--out", str(out / f"{prefix}shards"),
                        "--workers", "1", "--samples-per-shard", "16", "--no-progress"],
                       cwd=ROOT, env=env, check=True, capture_output=True)
    print("ok", out)


if __name__ == "__main__":
    main()
