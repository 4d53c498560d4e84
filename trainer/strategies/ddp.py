"""DistributedDataParallel: full replicas, gradients averaged by all-reduce (gloo on CPU, NCCL on GPU).

Everything else (optimizer, scaler, checkpoint on rank 0, EMA of full parameters) is the single
strategy's; gradients are identical on all ranks after backward, so the local grad norm is global.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.strategies.single import SingleStrategy


class DDPStrategy(SingleStrategy):
    name = "ddp"

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.dist.world_size == 1:
            return module  # DDP needs a process group; one process is just `single`
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Some parameters legitimately get no gradient in a step (the null text embedding when no
        # caption in the batch was dropped), so DDP must look for unused parameters.
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)

    def no_sync(self) -> contextlib.AbstractContextManager:
        if isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()
