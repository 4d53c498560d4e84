"""Storage faults of one strategy on 2 ranks, in one torchrun launch (tests/test_storage_faults_dist.py).

    torchrun --standalone --nproc_per_node 2 tests/storage_fault_driver.py --strategy fsdp \
        --shards S --work W --small T --report R.json

Each rank runs the real Trainer (trainer.builder, real shards) through, in order:
  ref       4 steps, checkpoints at 2 and 4 (the uninterrupted run)
  fallback  a copy of ref whose step-4 data file has 4096 bytes flipped (same size) rerun to step 4:
            it must fall back to step 2 and write a step-4 checkpoint equal to ref's
  full_sync the same run with out_dir on the tmpfs `--small` (mounted by the test), filled by rank 0 to
            room for one checkpoint and a half: the step-4 save (run.on_low_disk=warn: it is tried)
            must raise DiskFull on every rank
  full_async the same with run.async_save, through trainer.train.main (the CLI's exit code), last: main
            leaves the process group
Rank 0 writes the JSON report: each phase's outcome and message per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from test_storage_faults import flip_middle  # noqa: E402
from trainer_helpers import tiny_config  # noqa: E402

from common.config import load_config  # noqa: E402
from trainer import checkpoint as ckpt  # noqa: E402
from trainer import storage  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.distributed import exit_process, init_distributed  # noqa: E402
from trainer.loop import Trainer  # noqa: E402

SLACK = 256 << 10  # config.yaml, TensorBoard events, train_log.jsonl beside the checkpoints


def config_file(a, out_dir: Path, **run) -> Path:
    parallel = {"strategy": a.strategy, "zero_stage": 2}
    # one file per rank: both write it at the same moment
    return tiny_config(Path(a.work) / f"{out_dir.name}-{len(run)}-rank{os.environ.get('RANK', '0')}.yaml", a.shards, out_dir, parallel=parallel,
                       run={"steps": 4, "keep_last": 3, **run})


def train(a, out_dir: Path, dist_env, **run) -> dict:
    cfg = load_config(TrainConfig, config_file(a, out_dir, **run))
    try:
        trainer = Trainer(cfg, dist_env)
    except storage.StorageFault as e:
        return {"raised": type(e).__name__, "message": str(e)}
    try:
        return {"exit": trainer.train()}
    except storage.StorageFault as e:
        return {"raised": type(e).__name__, "message": str(e), "exit_code": e.exit_code}
    finally:
        trainer.close()


def largest_file(ckpt_dir: Path) -> Path:
    return max((p for p in ckpt_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def fill_to(small: Path, free: int) -> None:
    """Leave `free` bytes free on the filesystem of `small` (a file takes the rest)."""
    filler = small / "filler"
    filler.unlink(missing_ok=True)
    take = shutil.disk_usage(small).free - free
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, take)


def gathered(result: dict) -> list[dict]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, result)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--strategy", "--shards", "--work", "--small", "--report"):
        p.add_argument(flag, required=True)
    a = p.parse_args()
    work, small = Path(a.work), Path(a.small)
    dist_env = init_distributed("gloo")
    rank = dist_env.rank
    report: dict = {}

    ref = work / "ref"
    report["ref"] = gathered(train(a, ref, dist_env))
    ckpt_bytes = ckpt.recorded_bytes(ref / "checkpoints" / ckpt.step_dir_name(2))

    damaged = work / "fallback"
    if rank == 0:
        shutil.copytree(ref, damaged)
        bad = largest_file(damaged / "checkpoints" / ckpt.step_dir_name(4))
        flip_middle(bad)
        report["damaged_file"] = str(bad.relative_to(damaged / "checkpoints" / ckpt.step_dir_name(4)))
    dist.barrier()
    report["fallback"] = gathered(train(a, damaged, dist_env))

    for phase, run in (("full_sync", {}), ("full_async", {"async_save": True})):
        out = small / phase
        if rank == 0:
            shutil.rmtree(small / "full_sync", ignore_errors=True)
            fill_to(small, ckpt_bytes * 3 // 2 + SLACK)
        dist.barrier()
        if phase == "full_sync":
            result = train(a, out, dist_env, on_low_disk="warn", **run)
        else:
            from trainer.train import main as train_main

            sets = ["run.on_low_disk=warn", "run.async_save=true"]
            result = {"exit": train_main(["--config", str(config_file(a, out, **run))]
                                         + [x for s in sets for x in ("--set", s)])}
        if phase == "full_sync":
            dist.barrier()  # rank 0 removes the failed write's temp dir after the ranks' last barrier
        result["latest"] = getattr(ckpt.find_latest(out), "name", None)
        result["temp_dirs"] = [p.name for p in (out / "checkpoints").glob("*.tmp-*")]
        if phase == "full_sync":
            report[phase] = gathered(result)
        else:
            report[phase] = [result]  # the process group is gone: each rank reports its own
            Path(f"{a.report}.rank{rank}").write_text(json.dumps(result))
    report["checkpoint_bytes"] = ckpt_bytes
    if rank == 0:
        Path(a.report).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
    exit_process(0)  # the group was joined and left: no interpreter teardown (trainer.distributed)
