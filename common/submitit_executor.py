"""One place that turns "N nodes x G GPUs, C CPUs, T minutes" into a submitit executor.

Why a shared helper: the training launcher (`slurm.launch`) and the sharding array job
(`data_pipeline.shard --slurm`) must agree on log layout, signal timing and requeue limits, and a
user who learns one set of flags should find the same meaning in the other. It lives in common/
(it imports submitit and none of our packages) so that both may import it: data_pipeline must not
depend on slurm, the layer above it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import submitit

# Seconds before the time limit at which SLURM warns the job (USR2 for submitit, USR1 for train.sh).
# Long enough for a large model to finish its step and write a sharded checkpoint.
SIGNAL_DELAY_S = 120
# How many time-limit requeues submitit allows before it gives up (preemptions are not counted).
MAX_NUM_TIMEOUT = 20
# srun --wait: seconds the other tasks may outlive the first task that exits. A crashed rank then
# cannot leave the others blocked in a collective until the process-group timeout (30 min).
# VDM_SRUN_WAIT overrides it, as for slurm/train.sh.
SRUN_WAIT_S = 120


def srun_args() -> list[str]:
    return [f"--wait={int(os.environ.get('VDM_SRUN_WAIT', SRUN_WAIT_S))}"]


def parse_nodes(nodes: int | str) -> tuple[int, int]:
    """"4" -> (4, 4); "1-2" -> (1, 2): sbatch's --nodes=MIN-MAX, an allocation of any size in the range.

    Why ranges: on a busy or failing cluster a job that can start on fewer nodes starts sooner, and a
    requeued job is not stuck waiting for the size it had; the trainer resumes on any world size
    (docs/trainer.md, elastic resume)."""
    text = str(nodes).strip()
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high) if sep else int(low)
    except ValueError:
        raise ValueError(f"nodes={nodes!r}: expected N or MIN-MAX (e.g. 4 or 1-2)") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"nodes={nodes!r}: need 1 <= MIN <= MAX")
    return lo, hi


def node_params(nodes: int | str) -> tuple[int, dict[str, str]]:
    """(the node count submitit counts tasks with, extra sbatch options). submitit multiplies its
    `nodes` parameter by the tasks per node to know which task results to collect, so it gets MIN
    (the tasks every allocation has; rank 0 among them) while sbatch gets the range itself."""
    lo, hi = parse_nodes(nodes)
    return lo, ({} if lo == hi else {"nodes": f"{lo}-{hi}"})


def slurm_available() -> bool:
    """True when SLURM's client tools are on PATH (submitit's own test for choosing its SLURM executor)."""
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


def _extra_params(extra_sbatch: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """Accept {"qos": "high"} or ["qos=high", "--exclusive"] and give sbatch's long-option names.

    `--requeue` is always on: a preempted or timed-out job must be allowed back into the queue.
    """
    out: dict[str, Any] = {"requeue": True}
    if not extra_sbatch:
        return out
    if isinstance(extra_sbatch, dict):
        out.update({str(k).lstrip("-").replace("_", "-"): v for k, v in extra_sbatch.items()})
        return out
    for item in extra_sbatch:
        key, sep, value = str(item).lstrip("-").partition("=")
        if not key:
            raise ValueError(f"extra sbatch option {item!r} must look like key=value or --flag")
        out[key.replace("_", "-")] = value if sep else True
    return out


def make_executor(
    folder: str | Path,
    *,
    nodes: int | str = 1,
    tasks_per_node: int = 1,
    gpus_per_node: int = 0,
    cpus_per_task: int | None = None,
    partition: str | None = None,
    time_min: int = 60,
    array_parallelism: int | None = None,
    job_name: str = "vdm",
    extra_sbatch: dict[str, Any] | list[str] | None = None,
    setup: list[str] | None = None,
    cluster: str | None = "slurm",
) -> submitit.AutoExecutor:
    """A submitit executor for SLURM (default) or, with cluster="local"/"debug", this machine.

    `folder` may contain `%j` (job id); submitit writes the pickled call, stdout/stderr per task and
    the result there. With cluster="slurm" and no SLURM on PATH this fails now with a clear message
    instead of at submission time.
    """
    if cluster == "slurm" and not slurm_available():
        raise RuntimeError(
            "SLURM is not available on this machine (no sbatch/srun on PATH); "
            "start the local test cluster with `slurm/local_cluster.sh up` or run without --slurm"
        )
    min_nodes, node_range = node_params(nodes)
    for name, value, low in (("tasks_per_node", tasks_per_node, 1),
                             ("gpus_per_node", gpus_per_node, 0), ("time_min", time_min, 1)):
        if int(value) < low:
            raise ValueError(f"make_executor: {name}={value} must be >= {low}")
    Path(str(folder).split("%", 1)[0]).mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=MAX_NUM_TIMEOUT)
    params: dict[str, Any] = dict(
        name=job_name,
        nodes=min_nodes,
        tasks_per_node=int(tasks_per_node),
        timeout_min=int(time_min),
    )
    if gpus_per_node:
        params["gpus_per_node"] = int(gpus_per_node)
    if cpus_per_task:
        params["cpus_per_task"] = int(cpus_per_task)
    if ex.cluster == "slurm":
        params["slurm_signal_delay_s"] = SIGNAL_DELAY_S
        if partition:
            params["slurm_partition"] = partition
        if array_parallelism:
            params["slurm_array_parallelism"] = int(array_parallelism)
        params["slurm_additional_parameters"] = {**_extra_params(extra_sbatch), **node_range}
        params["slurm_srun_args"] = srun_args()
        if setup:
            params["slurm_setup"] = list(setup)
    ex.update_parameters(**params)
    return ex
