"""The contract between the training loop and how the model is parallelised.

Documented in docs/strategies.md (choosing a strategy, config keys, checkpoint formats) and
docs/trainer.md "Strategies" (the method list the loop calls).

The loop only ever calls these methods, so single-process, DDP, FSDP2 and DeepSpeed training share
one loop, one checkpoint format around the model state, and one EMA. A strategy owns the wrapped
model, the optimizer and any loss scaler; the model module itself never learns it is wrapped.

Beyond the basic step methods (all with working defaults here, so subclasses need not override):
- `no_sync()`: context for non-final gradient-accumulation micro-steps (DDP skips the all-reduce).
- `skip_step()`: called instead of `optimizer_step()` when the loop rejects a step (non-finite loss
  or grad norm); drops the gradients and lets a loss scaler back off.
- `make_optimizer()`, `autocast_dtype()`: shared helpers for subclasses.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.precision import autocast_dtype  # noqa: F401  (re-exported: subclasses' shared helper)
from trainer.config import TrainConfig
from trainer.distributed import DistEnv

STRATEGIES = {
    "single": "trainer.strategies.single:SingleStrategy",
    "ddp": "trainer.strategies.ddp:DDPStrategy",
    "fsdp": "trainer.strategies.fsdp:FSDPStrategy",
    "deepspeed": "trainer.strategies.deepspeed:DeepSpeedStrategy",
}


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW from `cfg.optim`; lr is set every step by the loop (trainer.lr), so the value here is a start."""
    o = cfg.optim
    params = list(params)
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    # CUDA: the fused kernel (one launch for all parameters instead of a dozen per tensor; DTensor
    # parameters of FSDP2 included). CPU: the plain per-tensor loop, as before (bitwise-stable resume).
    kwargs = {"fused": True} if on_cuda else {"foreach": False} if not torch.cuda.is_available() else {}
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             **kwargs)


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` moved to `device`, or left as it is when every tensor is there already: a model built
    under FakeTensorMode (trainer.plan's simulation) cannot be moved, even to its own device."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device for t in tensors):
        return model
    return model.to(device)


class Strategy(abc.ABC):
    name: str = "base"

    def __init__(self, cfg: TrainConfig, dist_env: DistEnv):
        self.cfg = cfg
        self.dist = dist_env
        self.device = dist_env.device
        self.model: nn.Module | None = None  # the wrapped module the loop calls through forward()
        self.module: nn.Module | None = None  # the model itself (its parameters may be sharded)
        self.optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ building
    @abc.abstractmethod
    def setup(self, model: nn.Module) -> None:
        """Wrap `model` (moved to self.device) and build the optimizer."""

    # ------------------------------------------------------------------ one step
    def forward(self, *args, **kwargs) -> Tensor:
        return self.model(*args, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = autocast_dtype(self.cfg.run.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abc.abstractmethod
    def backward(self, loss: Tensor) -> None: ...

    @abc.abstractmethod
    def clip_grad_norm(self, max_norm: float) -> float: ...

    @abc.abstractmethod
    def optimizer_step(self) -> None: ...

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ state
    @abc.abstractmethod
    def local_params(self) -> list[Tensor]: ...

    # True: save()/load() carry the EMA inside the strategy's own (topology-independent) state, keyed by
    # parameter name; False: trainer.checkpoint keeps it per rank in ema-rank{r}.pt (DeepSpeed)
    saves_ema: bool = False

    @abc.abstractmethod
    def save(self, ckpt_dir: Path, ema: list[Tensor] | None = None, background: bool = False) -> Future:
        """Collective. `ema`: the EMA shadow (parallel to local_params()), stored when `saves_ema`.
        `background`: copy the state now and write it in a background thread (trainer.async_write);
        the future completes when this rank's files are written (at once when not `background`)."""

    def background_group(self) -> dist.ProcessGroup | None:
        """The process group background checkpoint writes coordinate over, made on first use (every
        rank saves at the same step, so every rank makes it at the same point): a gloo group of its
        own, since a collective of the writer thread on the default group could pair with one of the
        training loop's on another rank; also on one NCCL rank, whose default group DCP cannot use
        for a CPU-side save. None without a process group."""
        if not dist.is_initialized():
            return None
        if getattr(self, "_background_group", None) is None:
            self._background_group = dist.new_group(backend="gloo")
        return self._background_group

    def background_host_copies(self):
        """Host buffers for the torch.save files written in the background (trainer.async_write),
        kept for the whole run like `background_stager`'s."""
        if getattr(self, "_background_host_copies", None) is None:
            from trainer.async_write import HostCopies

            self._background_host_copies = HostCopies(pin=self.device.type == "cuda")
        return self._background_host_copies

    def background_stager(self):
        """DCP's stager for background saves, kept for the whole run: it copies each tensor into CPU
        memory it allocated at the first save and reuses (a fresh copy of a large state spends most of
        its time faulting pages in), pinned for fast device-to-host copies on CUDA. The copy itself
        is synchronous, so the next optimizer step cannot change what is being saved."""
        if getattr(self, "_background_stager", None) is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = self.device.type == "cuda"
            self._background_stager = DefaultStager(StagingOptions(
                use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                use_non_blocking_copy=cuda))
        return self._background_stager

    @abc.abstractmethod
    def load(self, ckpt_dir: Path, ema: list[Tensor] | None = None) -> bool:
        """Collective. Loads model + optimizer state, and the EMA into `ema` in place when the checkpoint
        holds one; returns whether it did (False: an older checkpoint, EMA in ema-rank{r}.pt)."""

    def named_ema(self, ema: list[Tensor]) -> dict[str, Tensor]:
        """The EMA shadow keyed by parameter name, as tensors sharing storage with `ema` (so a DCP load
        fills the shadow in place); under sharding, each with its parameter's sharding."""
        names = [n for n, p in self.unwrapped_model().named_parameters() if p.requires_grad]
        if len(names) != len(ema):
            raise ValueError(f"EMA has {len(ema)} tensors for {len(names)} trainable parameters")
        return dict(zip(names, ema))

    @abc.abstractmethod
    def gather_full_state(self, tensors: list[Tensor] | None = None) -> dict[str, Tensor] | None: ...

    @abc.abstractmethod
    def unwrapped_model(self) -> nn.Module: ...

    # ------------------------------------------------------------------ collectives (no-ops alone)
    def _all_reduce(self, x: float, op) -> float:
        if self.dist.world_size == 1 or not dist.is_initialized():
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64,
                         device=self.device if self.dist.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=op)
        return float(t.item())

    def all_reduce_mean(self, x: float) -> float:
        return self._all_reduce(x, dist.ReduceOp.SUM) / self.dist.world_size

    def all_reduce_max(self, x: float) -> float:
        return self._all_reduce(x, dist.ReduceOp.MAX)

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] (picklable objects; [obj] alone)."""
        if self.dist.world_size == 1 or not dist.is_initialized():
            return [obj]
        out = [None] * dist.get_world_size()  # the real group's size (tests may run a group of one)
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.dist.world_size > 1 and dist.is_initialized():
            dist.barrier()


def build_strategy(cfg: TrainConfig, dist_env: DistEnv) -> Strategy:
    """The strategy named by cfg.parallel.strategy; imported lazily (DeepSpeed is slow to import)."""
    name = cfg.parallel.strategy
    if name not in STRATEGIES:
        raise ValueError(f"parallel.strategy {name!r} is not one of {sorted(STRATEGIES)}")
    module_name, cls_name = STRATEGIES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg, dist_env)
