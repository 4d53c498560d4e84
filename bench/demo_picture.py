"""python -m bench.demo_picture DEMO_OUT [--step N] [--out docs/img/demo_samples.png]: the README's
picture of a finished `make demo`: one row per training-time sample at step N (the config's
`run.sample_prompts`), then the CLI's extended sample (`cli_sample.mp4`), 8 frames per row, each frame
upscaled 4x.

python -m bench.demo_picture DEMO_OUT --conditional [--out docs/img/demo_conditional.png]: the demo's
conditional generation, one held-out clip per task (DEMO_OUT/conditional/, written by
`trainer.evaluate --examples`): rows observed, generated, truth, drawn the same way, labelled."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

FRAMES_PER_ROW, UPSCALE = 8, 4


def _frames(path: Path) -> np.ndarray:
    """All frames of an mp4, uint8 [F, H, W, 3]."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise SystemExit(f"{path}: no frames decoded")
    return np.stack(frames)


def rows_of(video: np.ndarray) -> list[np.ndarray]:
    """[F, H, W, 3] -> rows of FRAMES_PER_ROW frames side by side (a short last row is padded black)."""
    rows = []
    for start in range(0, len(video), FRAMES_PER_ROW):
        chunk = video[start:start + FRAMES_PER_ROW]
        pad = np.zeros((FRAMES_PER_ROW - len(chunk), *video.shape[1:]), video.dtype)
        rows.append(np.concatenate(list(np.concatenate([chunk, pad])), axis=1))
    return rows


CONDITIONAL_TASKS = ("predict", "interpolate", "upsample")
CONDITIONAL_PARTS = (("observed", "observed"), ("completed", "generated"), ("truth", "truth"))
LABEL_WIDTH = 150  # px left of each row (after upscaling) for its label


def conditional_picture(examples_dir: Path, out: Path) -> Image.Image:
    """Per task (the ones in examples_dir): its observed, generated and true frames as three labelled
    rows, frames upscaled UPSCALE x (nearest, so low-resolution input stays visibly blocky)."""
    from PIL import ImageDraw

    rows, labels = [], []
    for task in CONDITIONAL_TASKS:
        if not (examples_dir / f"{task}.truth.npy").is_file():
            continue
        for part, label in CONDITIONAL_PARTS:
            video = np.load(examples_dir / f"{task}.{part}.npy", allow_pickle=False)
            rows += rows_of(video)
            labels.append((f"{task}: {label}", len(rows_of(video))))
    if not rows:
        raise SystemExit(f"{examples_dir} holds no task examples: run trainer.evaluate --task ... --examples DIR")
    grid = np.concatenate(rows, axis=0)
    up = Image.fromarray(grid).resize((grid.shape[1] * UPSCALE, grid.shape[0] * UPSCALE), Image.NEAREST)
    image = Image.new("RGB", (up.width + LABEL_WIDTH, up.height), (255, 255, 255))
    image.paste(up, (LABEL_WIDTH, 0))
    draw, row_height, y = ImageDraw.Draw(image), rows[0].shape[0] * UPSCALE, 0
    for text, n in labels:
        draw.text((6, y + row_height // 2 - 6), text, fill=(0, 0, 0))
        y += n * row_height
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("demo_out", type=Path)
    p.add_argument("--step", type=int, help="training sample step (default: the last one)")
    p.add_argument("--out", type=Path, help="default: docs/img/demo_samples.png (--conditional: demo_conditional.png)")
    p.add_argument("--conditional", action="store_true", help="draw the conditional-generation picture instead")
    a = p.parse_args(argv)
    if a.conditional:
        out = a.out or Path("docs/img/demo_conditional.png")
        image = conditional_picture(a.demo_out / "conditional", out)
        print(f"wrote {out} ({image.width}x{image.height}) from {a.demo_out / 'conditional'}")
        return 0
    a.out = a.out or Path("docs/img/demo_samples.png")
    steps = sorted((a.demo_out / "run" / "samples").glob("step-*"))
    if not steps:
        raise SystemExit(f"{a.demo_out}/run/samples has no step-* folders: run `make demo` first")
    step_dir = a.demo_out / "run" / "samples" / f"step-{a.step:06d}" if a.step else steps[-1]
    videos = [_frames(f) for f in sorted(step_dir.glob("*.mp4"))] + [_frames(a.demo_out / "cli_sample.mp4")]
    grid = np.concatenate([row for v in videos for row in rows_of(v)], axis=0)
    image = Image.fromarray(grid).resize((grid.shape[1] * UPSCALE, grid.shape[0] * UPSCALE), Image.BILINEAR)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(a.out)
    print(f"wrote {a.out} ({image.width}x{image.height}) from {step_dir.name} and cli_sample.mp4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
