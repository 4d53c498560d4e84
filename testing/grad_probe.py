"""A `run.callbacks` entry that writes the full gradient of chosen parameters at the first step, before
the clip and the optimizer step: tests compare what each strategy computes with a single process.

    --set 'run.callbacks=[testing.grad_probe:GradProbe]'   with VDM_TEST_GRAD_PROBE=OUT.pt and
    VDM_TEST_GRAD_PROBE_PREFIX=motion_cond.head (parameter names that start with it)

Collective under FSDP2 and DeepSpeed (every rank gathers; rank 0 writes). How each strategy keeps its
gradients is this probe's business, not the trainer's.
"""

from __future__ import annotations

import os

import torch

from trainer.callbacks import Callback

SPEC = "testing.grad_probe:GradProbe"


def full_grad(strategy, param: torch.Tensor) -> torch.Tensor:
    """The whole gradient of `param` as the optimizer will see it (averaged over ranks), on the CPU."""
    if getattr(strategy, "engine", None) is not None:  # DeepSpeed: partitioned in its optimizer
        from deepspeed.utils import safe_get_full_grad

        grad = safe_get_full_grad(param)
    else:
        grad = param.grad
        if grad is not None and hasattr(grad, "full_tensor"):  # FSDP2: a DTensor shard
            grad = grad.full_tensor()
    if grad is None:
        raise RuntimeError("no gradient for a probed parameter")
    return grad.detach().float().cpu().clone()


class GradProbe(Callback):
    def __init__(self):
        self.out = os.environ.get("VDM_TEST_GRAD_PROBE", "")
        self.prefix = os.environ.get("VDM_TEST_GRAD_PROBE_PREFIX", "")
        self.done = False

    def before_optimizer_step(self, trainer, first_step: int) -> None:
        if not self.out or self.done:
            return
        self.done = True
        named = trainer.strategy.unwrapped_model().named_parameters()
        grads = {name: full_grad(trainer.strategy, p) for name, p in named if name.startswith(self.prefix)}
        if trainer.rank == 0:
            torch.save(grads, self.out)
