"""What verified checkpoints cost (issue 23): the size + CRC-32 manifest at save and the check at resume.

    python -m bench.bench_checkpoint_verify --config configs/vdm_t2v_small_16x64.yaml [--set k=v ...]

Builds the config's model with the single strategy, AdamW state for every parameter (one step) and an
EMA, then, `--repeats` times: a synchronous save_checkpoint (its commit computes the manifest), the
manifest alone over the written files, and the resume-time checks (sizes only; sizes + CRC-32). The
files are then in the page cache, as they are for a save and for a resume soon after it; a cold read
from disk costs the disk's read time on top. One JSON line with medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/vdm_t2v_small_16x64.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where checkpoints are written (default: a temp dir; removed after)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)

    from bench.bench_trainer import synthetic_batch, train_step
    from common.config import load_config
    from model.diffusion import GaussianDiffusion
    from model.unet import SpaceTimeUNet
    from trainer import checkpoint as ckpt
    from trainer import checkpoint_verify
    from trainer.config import TrainConfig
    from trainer.distributed import DistEnv
    from trainer.ema import EMA
    from trainer.strategies.base import build_strategy

    cfg = load_config(TrainConfig, a.config, ["parallel.strategy=single"] + a.overrides)
    torch.manual_seed(0)
    model = SpaceTimeUNet(cfg.model)
    strategy = build_strategy(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    strategy.setup(model)
    ema = EMA(strategy.local_params(), cfg.run.ema_decay)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    x, cond = synthetic_batch(cfg, cfg.data.batch_size, torch.device("cpu"))
    train_step(strategy, diffusion, x, cond)
    ema.update(strategy.local_params())

    root = Path(a.dir or tempfile.mkdtemp(prefix="bench_verify_"))
    times: dict[str, list[float]] = {"save_s": [], "manifest_s": [], "verify_sizes_s": [], "verify_crc32_s": []}
    nbytes = 0
    try:
        for i in range(a.repeats):
            out = root / f"run{i}"
            t0 = time.perf_counter()
            saved = ckpt.save_checkpoint(strategy, out, 1, ema=ema, loader_state={}, state={}, keep_last=1)
            times["save_s"].append(time.perf_counter() - t0)
            nbytes = ckpt.recorded_bytes(saved)
            t0 = time.perf_counter()
            checkpoint_verify.manifest(saved, exclude={ckpt.STATE_FILE})
            times["manifest_s"].append(time.perf_counter() - t0)
            for key, checksums in (("verify_sizes_s", False), ("verify_crc32_s", True)):
                t0 = time.perf_counter()
                assert ckpt.verify_checkpoint(saved, checksums=checksums) == []
                times[key].append(time.perf_counter() - t0)
            shutil.rmtree(out)
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    result = {"checkpoint_mb": round(nbytes / 1e6), **{k: round(statistics.median(v), 3) for k, v in times.items()}}
    result["manifest_share_of_save"] = round(result["manifest_s"] / result["save_s"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
