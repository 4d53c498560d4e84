"""Process-group set-up from the launcher's environment (torchrun or SLURM).

The same code must run as one CPU process, as `torchrun --nproc_per_node 2` over gloo in tests, and
as srun-launched tasks over NCCL on GPU nodes; so rank, world size, device and backend are read from
the environment, never assumed.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

_joined_a_group = False  # set once this process has been in a process group (see exit_process)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def read_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (_env_int("RANK", default=0), _env_int("WORLD_SIZE", default=1),
                _env_int("LOCAL_RANK", default=0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return (_env_int("SLURM_PROCID", default=0), _env_int("SLURM_NTASKS", default=1),
                _env_int("SLURM_LOCALID", default=0))
    return 0, 1, 0


def init_distributed(backend: str = "") -> DistEnv:
    """Join (or create) the default process group; harmless to call twice.

    backend "" picks nccl when CUDA is available and gloo otherwise. With world size 1 no group is
    created, so single-process runs need no MASTER_ADDR.
    """
    rank, world_size, local_rank = read_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if world_size == 1:
        return DistEnv(rank, 1, local_rank, device, None)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        # RANK/WORLD_SIZE may come from SLURM only; the env:// rendezvous wants them under these names.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        timeout = datetime.timedelta(minutes=float(os.environ.get("VDM_DIST_TIMEOUT_MIN", "30")))
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    global _joined_a_group
    _joined_a_group = True
    return DistEnv(rank, world_size, local_rank, device, backend)


def destroy_distributed(synchronize: bool = True) -> None:
    """Leave the process group.

    On a clean exit every rank first waits at a barrier: a rank that tears its gloo group down while a
    peer is still writing its output (rank 0 saving a file while rank 1 has nothing left to do) can
    abort with "terminate called without an active exception" and fail the whole torchrun job. After
    an error `synchronize=False` skips the barrier, since the failed peers may never arrive
    (torchtitan learnt the same, pytorch/torchtitan#1342).
    """
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def leave_process_group_on_exit():
    """Run a distributed command's body, then leave the process group: synchronised after a clean
    finish (a `return` included), without the barrier when the body raised."""
    finished = False
    try:
        yield
        finished = True
    finally:
        destroy_distributed(synchronize=finished)


def exit_process(code: int) -> NoReturn:
    """End a command with `code`; after a process group, without the interpreter's teardown.

    `destroy_process_group` does not stop gloo's worker threads: DTensor's module-level caches
    (sharding propagation, redistribute plans) keep the DeviceMesh, and through it the group, alive
    until interpreter finalization. A worker that needs the GIL then (to free a tensor that has a
    Python object) is torn out of a C++ destructor and the process aborts with "terminate called
    without an active exception" (SIGABRT) after its work succeeded: CI saw it once, on a 2-rank fsdp
    resume, and torchrun reports the whole job failed. PyTorch has no fix yet (pytorch/pytorch#179291
    was abandoned), so once a group was joined the process flushes its output and leaves with
    `os._exit`. Everything it wrote is closed by its owner before this point (the Trainer closes its
    metrics and data-loader workers, checkpoints are waited for); atexit handlers do not run.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if not _joined_a_group:
        sys.exit(code)
    logging.shutdown()
    os._exit(code)
