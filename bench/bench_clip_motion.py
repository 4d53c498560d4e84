"""CPU cost of measuring each clip's global motion at shard time (data_pipeline.clip_motion: a grey,
area-averaged copy of the full frame and a closed-form similarity fit) next to the clip decode it
rides on, in one process on the same videos (an A/B with the measurement switched off).

    python -m bench.bench_clip_motion [--videos 8] [--repeats 3]

Videos: `data_pipeline.synthetic.textured_clip` at 320x240, 48 frames at 24 fps (a pan over a
texture, the planner's calibration footage); clips of 16 frames at 64x64 (the small config's).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def per_video_cpu_ms(paths: list[str], repeats: int) -> float:
    from data_pipeline.config import ClipConfig
    from data_pipeline.video import decode_clips

    cfg = ClipConfig(frames=16, height=64, width=64)
    t = time.process_time()
    for _ in range(repeats):
        for p in paths:
            decode_clips(p, cfg)
    return (time.process_time() - t) / (repeats * len(paths)) * 1000


class _Off:
    """FullFrameMotion switched off (the B of the A/B)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, picked):
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    import data_pipeline.video as video
    from common.mp4 import write_video, x264_options
    from data_pipeline.synthetic import textured_clip

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(a.videos):
            frames, _ = textured_clip(rng, 48, 240, 320)
            paths.append(str(Path(tmp) / f"tex{i}.mp4"))
            write_video(paths[-1], frames, 24, codec="libx264", **x264_options())
        per_video_cpu_ms(paths, 1)  # warm-up
        with_motion = per_video_cpu_ms(paths, a.repeats)
        measure, video.FullFrameMotion = video.FullFrameMotion, _Off
        try:
            without = per_video_cpu_ms(paths, a.repeats)
        finally:
            video.FullFrameMotion = measure
    print(f"decode_clips per 320x240 video (16 frames -> 64x64): {without:.1f} CPU-ms without the motion, "
          f"{with_motion:.1f} with it (+{with_motion - without:.1f} CPU-ms, {with_motion / without - 1:+.0%})")


if __name__ == "__main__":
    main()
