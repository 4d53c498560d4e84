"""A process group for sharded strategies even in a one-process run.

FSDP2 and DeepSpeed refuse to start without torch.distributed, while `trainer.distributed` creates
no group for world size 1 (single/DDP do not need one). A private in-memory store gives a one-rank
group without MASTER_ADDR/MASTER_PORT, so `--set parallel.strategy=fsdp` also works in a plain
`python -m trainer.train` (handy for debugging on a laptop).
"""

from __future__ import annotations

import torch.distributed as dist

from trainer.distributed import DistEnv


def ensure_process_group(env: DistEnv, who: str) -> None:
    if dist.is_initialized():
        return
    if env.world_size > 1:
        raise RuntimeError(f"{who}: world_size={env.world_size} but no process group; "
                           "launch with torchrun or srun (trainer.distributed.init_distributed creates it)")
    backend = env.backend or ("nccl" if env.device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
