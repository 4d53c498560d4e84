"""Rank and rendezvous variables for a task started by SLURM (srun / submitit).

Why here and not in the trainer: `slurm/train.sh` (bash) and `slurm.launch` (submitit) must give
every task the same MASTER_ADDR/MASTER_PORT and ranks, and they must agree with each other, so the
derivation lives in one small module that both the launcher and the tests use. The trainer only
reads the standard torch variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping

BASE_PORT = 29500
PORT_SPAN = 2000  # ports 29500..31499: below Linux's ephemeral range (32768+), above SLURM's own


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list ("gpu[01-03,7],login1") without calling scontrol."""
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", group)
        if not m:
            hosts.append(group)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """Hosts of a job, as `scontrol show hostnames` gives them (our own parser when it is absent)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)


def master_port(job_id: str | int | None) -> int:
    """Port from the job id, so two jobs sharing a node do not fight over 29500 (train.sh: same formula)."""
    digits = re.sub(r"\D", "", str(job_id or 0)) or "0"
    return BASE_PORT + int(digits) % PORT_SPAN


def dist_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT for this task.

    Unset SLURM variables mean a single process (rank 0 of 1; MASTER_ADDR/PORT from the environment
    or 127.0.0.1:29500). Inside a job they are always derived from the job: sbatch exports the
    submitting shell's environment, and a stale MASTER_ADDR there must not split the ranks.
    """
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    first_host = hostnames(nodelist)[0] if nodelist else "127.0.0.1"
    ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
    per_node = (env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1").split("(")[0]
    # SLURM_ARRAY_JOB_ID alone is shared by all tasks of an array; SLURM_JOB_ID is unique per task.
    return {
        "RANK": env.get("SLURM_PROCID", "0"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": ntasks,
        "LOCAL_WORLD_SIZE": per_node.split(",")[0],
        "MASTER_ADDR": first_host if nodelist else env.get("MASTER_ADDR", first_host),
        "MASTER_PORT": (str(master_port(env["SLURM_JOB_ID"])) if env.get("SLURM_JOB_ID")
                        else env.get("MASTER_PORT", str(BASE_PORT))),
    }


def describe(env: Mapping[str, str]) -> str:
    """One log line that lets a user check all ranks agree on the rendezvous."""
    return (f"rank {env['RANK']}/{env['WORLD_SIZE']} local_rank {env['LOCAL_RANK']} "
            f"node {os.environ.get('SLURMD_NODENAME', os.uname().nodename)} "
            f"MASTER_ADDR={env['MASTER_ADDR']} MASTER_PORT={env['MASTER_PORT']}")
