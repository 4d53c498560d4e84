"""Helpers for tests that run jobs on the real local SLURM cluster (slurm/local_cluster.sh)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def cluster_up() -> str | None:
    """None when a SLURM controller answers and has idle/mixed nodes, else the reason why not."""
    try:
        subprocess.run(["scontrol", "ping"], check=True, capture_output=True, timeout=10)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=True, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError) as e:
        return f"no SLURM cluster ({e}); start one with `slurm/local_cluster.sh up` (root)"
    states = [line.split()[1] for line in nodes if len(line.split()) > 1]
    # transient states (completing, allocated, mixed, ...) are fine; these never run a new job
    if not any(not re.search(r"down|drain|fail|unk|inval|future|power|\*", st) for st in states):
        return f"SLURM nodes not usable: {nodes}"
    return None


def require_cluster(min_nodes: int = 1) -> None:
    """Skip when the cluster is not usable (a failure under CI=true: see conftest.py)."""
    reason = cluster_up()
    if reason is None:
        # a node is listed once per partition it is in
        n = len(set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()))
        if n < min_nodes:
            reason = f"the cluster has {n} node(s), the test needs {min_nodes}"
    if reason is not None:
        pytest.skip(f"the SLURM cluster is not usable: {reason}")


def wait_nodes_idle(names: list[str], timeout_s: float) -> None:
    """Poll sinfo until every named node is idle (not completing a job, not allocated)."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30).stdout
        states = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
        if all(states.get(n) == "idle" for n in names):
            return
        time.sleep(0.5)
    pytest.fail(f"nodes {names} not idle after {timeout_s:.0f} s: {states}")


def job_state(job_id: str) -> str:
    """State of the job's allocation from sacct (accounting), else squeue, else ''."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                         text=True, timeout=30).stdout.split()
    if out:
        return out[0].split()[0]
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    return out[0] if out else ""


def wait_batch_step_ended(job_id: str, timeout_s: float) -> str:
    """Poll until the job's batch step (the script itself) has ended: the script can then no longer
    act (e.g. requeue the job). Returns the job's state then: a final one, or PENDING/REQUEUED when
    it was requeued. Fails the test on timeout.

    The witness is the controller, not sacct: a job stays COMPLETING until every process of every
    step, the batch script included, has exited. sacct is none for a cancelled job: from the cancel
    on it reports the batch step CANCELLED with the cancel's time as its end while the script still
    runs (seen on this cluster: a script trapping SIGTERM ran 6 s past that "end")."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        r = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                           timeout=30)
        state = r.stdout.strip()
        if state in TERMINAL or state in ("PENDING", "REQUEUED"):
            return state
        if r.returncode != 0 and "Invalid job id" in r.stderr:  # purged from the controller: long over
            return job_state(job_id)
        time.sleep(0.5)
    pytest.fail(f"the batch step of job {job_id} did not end within {timeout_s:.0f} s (state {state!r})")


def wait_state(job_id: str, states: set[str], timeout_s: float) -> str:
    """Poll until the job reaches one of `states`; fails the test (with the state) on timeout."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in states:
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], capture_output=True)
    pytest.fail(f"job {job_id} not in {sorted(states)} after {timeout_s:.0f} s (state {state!r}); cancelled")


def wait_file(path: Path, timeout_s: float, job_id: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return
        if job_id and job_state(job_id) in TERMINAL:
            break
        time.sleep(0.2)
    if job_id:
        subprocess.run(["scancel", job_id], capture_output=True)
    pytest.fail(f"{path} did not appear within {timeout_s:.0f} s (job {job_id} state {job_id and job_state(job_id)})")


def probe_env(**extra: str) -> dict[str, str]:
    """Environment that makes the launchers run tests/slurm_probe.py instead of the trainer."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["VDM_TRAIN_MODULE"] = "slurm_probe"
    env.update(extra)
    return env


def sbatch(args: list[str], env: dict[str, str] | None = None) -> str:
    """Submit from the repo root; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def require_partition(name: str) -> None:
    if subprocess.run(["scontrol", "show", "partition", name], capture_output=True, timeout=30).returncode != 0:
        pytest.skip(f"the cluster has no partition {name!r}: its slurm.conf predates it "
                    "(slurm/local_cluster.sh down && slurm/local_cluster.sh up)")


def grace_time(partition: str) -> int:
    show = subprocess.run(["scontrol", "show", "partition", partition], capture_output=True, text=True, timeout=30)
    return int(re.search(r"GraceTime=(\d+)", show.stdout).group(1))


def set_grace_time(partition: str, seconds: int) -> None:
    r = subprocess.run(["scontrol", "update", f"PartitionName={partition}", f"GraceTime={seconds}"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot set GraceTime of partition {partition} (needs a SLURM admin): {r.stderr.strip()}")
