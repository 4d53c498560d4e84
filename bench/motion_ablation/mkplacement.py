"""mkplacement.py OUT MODE: the demo's videos (64 + 16 held out, 8 frames, 32 px, travel 0.3, seeds 0 and
12345) with the shapes placed by MODE, written where `python -m trainer.demo --out OUT` picks them up:

  inside  the shape fits the clip's travel (the demo before the extension fix: room 1.0)
  room15  it could go on for 1.5 times its travel (the demo now: trainer/demo.py DEMO_ROOM)
  exit    it starts anywhere wholly inside and may leave the frame (no wrap-around), as objects
          leave a camera's view

docs/motion.md, "Extension across the window boundary", has the table these made.
"""

import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.mp4 import write_video  # noqa: E402
from data_pipeline.synthetic import COLOURS, DIRECTIONS, SHAPES, inside_start, render_clip, shape_radius  # noqa: E402


def start_for(mode: str, rng: np.random.Generator, direction: str) -> tuple[float, float]:
    if mode == "exit":
        r = shape_radius(32, 32) + 0.5
        return float(rng.uniform(r, 31 - r)), float(rng.uniform(r, 31 - r))
    return inside_start(rng, direction, 32, 32, 0.3, room={"inside": 1.0, "room15": 1.5}[mode])


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    for sub, n, seed in (("videos", 64, 0), ("val_videos", 16, 12345)):
        folder = out / sub
        (folder / "videos").mkdir(parents=True, exist_ok=True)
        rng, rows = np.random.default_rng(seed), []
        for i in range(n):  # the draw order of data_pipeline.synthetic.make_synthetic_videos
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
            clip = render_clip(shape, colour, direction, 8, 32, 32, start_for(mode, rng, direction), travel=0.3,
                               wrap=False)
            path = folder / "videos" / f"vid{i:06d}.mp4"
            write_video(path, clip, 8, crf="20", preset="veryfast", threads="1",
                        **{"x264-params": "sync-lookahead=0:mbtree=0"})
            rows.append((path.stem, str(path), f"a {colour} {shape} moving {direction}"))
        with open(folder / "manifest.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["key", "path", "caption"])
            writer.writerows(rows)
    print("ok", out)


if __name__ == "__main__":
    main()
