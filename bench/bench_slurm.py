"""Latency of the SLURM launch paths on the local cluster (slurm/local_cluster.sh up, 2 virtual nodes).

    .venv/bin/python -m bench.bench_slurm [--repeats 3]

Measures what a user waits for, not training speed: sbatch -> 2-node train.sh job done (probe
trainer), USR1 -> requeued job running again, and submitit submit -> result. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from slurm_helpers import probe_env, sbatch  # noqa: E402

SMALL = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5"]


def state(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True)
    return (out.stdout.split() or [""])[0]


def wait(pred, timeout=180.0) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("benchmark wait timed out")
        time.sleep(0.05)
    return time.monotonic()


def sbatch_turnaround(tmp: Path) -> float:
    run = tmp / f"r{time.monotonic_ns()}"
    t0 = time.monotonic()
    job = sbatch([*SMALL, f"--output={tmp}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  "--set", f"run.out_dir={run}"], env=probe_env())
    return wait(lambda: state(job) == "COMPLETED") - t0


def requeue_turnaround(tmp: Path) -> float:
    run = tmp / f"q{time.monotonic_ns()}"
    job = sbatch([*SMALL, f"--output={tmp}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  "--set", f"run.out_dir={run}"], env=probe_env(PROBE_SECONDS="60"))
    wait(lambda: (run / "probe-rank0-restart0.started").exists() and (run / "probe-rank1-restart0.started").exists())
    t0 = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    t1 = wait(lambda: (run / "probe-rank0-restart1.started").exists())
    wait(lambda: state(job) == "COMPLETED")
    return t1 - t0


def submitit_turnaround(tmp: Path) -> float:
    from common.submitit_executor import make_executor

    ex = make_executor(tmp / "submitit" / "%j", nodes=2, cpus_per_task=1, time_min=5)
    t0 = time.monotonic()
    assert ex.submit(os.getpid).results()
    return time.monotonic() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.chdir(REPO)
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as d:
        tmp = Path(d)
        rows = []
        for name, fn in [("sbatch train.sh (2 nodes, probe trainer) -> COMPLETED", sbatch_turnaround),
                         ("scancel --signal=USR1 -> requeued job's tasks running again", requeue_turnaround),
                         ("submitit submit (2 nodes) -> results()", submitit_turnaround)]:
            ts = [fn(tmp) for _ in range(args.repeats)]
            rows.append((name, statistics.median(ts), min(ts), max(ts)))
    print("| what | median s | min s | max s |\n|---|---|---|---|")
    for name, med, lo, hi in rows:
        print(f"| {name} | {med:.1f} | {lo:.1f} | {hi:.1f} |")


if __name__ == "__main__":
    main()
