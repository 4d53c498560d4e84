"""FSDP2: every block's parameters, gradients and optimizer state are sharded across ranks.

`fully_shard` is applied to each block first and then to the root (torchtitan style), so a block's
full weights exist only while that block runs; the root unit keeps the leftovers (embeddings, in/out
convs). What this buys over DDP is memory: parameters + AdamW state per rank ≈ 1/world_size.

Precision: bf16 uses `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: sharded fp32
master weights, bf16 compute after the all-gather, fp32 gradient reduce-scatter. fp16 does the same
with fp16 compute plus dynamic loss scaling. FSDP casts the inputs itself, so `autocast()` is a no-op.

Gradients are DTensors sharded on dim 0. The global norm is sqrt(all_reduce(Σ local ‖g‖²)), which
needs the local shards only; the per-rank shards are disjoint, so nothing is counted twice.

Checkpoints are DCP (torch.distributed.checkpoint, trainer.strategies.dcp_state): every rank writes
its own shards of model, optimizer and EMA (the EMA as DTensors with the parameters' sharding) in
parallel into `<ckpt>/dcp/`, keyed by parameter name; they load back into the same or a different
number of ranks, and single/ddp read them (and write the same format) too.
"""

from __future__ import annotations

import contextlib
import json
import math
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model.precision import autocast_dtype
from trainer.strategies import dcp_state
from trainer.strategies.base import Strategy, make_optimizer, on_device
from trainer.strategies.dcp_state import DCP_DIR
from trainer.strategies.process_group import ensure_process_group

SCALER_FILE = "fsdp_scaler.json"


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules to wrap one by one before the root, innermost first.

    A model may name them with a `blocks()` method (SpaceTimeUNet does: its residual and attention
    blocks); otherwise every element of an nn.ModuleList that owns parameters is a unit.
    """
    blocks = getattr(model, "blocks", None)
    if callable(blocks):
        units = list(blocks())
    else:
        units = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m
                 if any(True for _ in child.parameters())]
    # innermost first: a nested unit must be sharded before the unit that contains it
    depth = {id(m): name.count(".") for name, m in model.named_modules()}
    return sorted(units, key=lambda m: -depth.get(id(m), 0))


class _LossScaler:
    """Dynamic loss scale for fp16 whose skip/grow decisions are global.

    torch's GradScaler decides per rank from the local gradient shard, so under sharding one rank
    could skip while another steps. Here the decision comes from the all-reduced grad norm that the
    loop already uses, so every rank scales, skips and grows in lockstep.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def stepped(self) -> None:
        if not self.enabled:
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2.0

    def skipped(self) -> None:
        if self.enabled:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])


class FSDPStrategy(Strategy):
    name = "fsdp"
    saves_ema = True  # in the DCP state, as DTensors: reshards with the model

    def device_mesh(self) -> DeviceMesh:
        """The 1-D mesh of every rank, made once and handed to each fully_shard. Made explicitly (not
        left to fully_shard's default) so that trainer.plan can make it before it enters FakeTensorMode,
        where mesh creation fails on a data-dependent op."""
        if getattr(self, "_mesh", None) is None:
            ensure_process_group(self.dist, "fsdp")
            self._mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        return self._mesh

    def setup(self, model: nn.Module) -> None:
        mesh = self.device_mesh()
        precision = self.cfg.run.precision
        compute = autocast_dtype(precision)
        # reduce in fp32 whatever the compute dtype; only the root hands fp32 back (for the loss
        # math): inner units must pass compute-dtype activations to root-owned layers between them
        unit_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        root_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32,
                                           output_dtype=torch.float32 if compute is not None else None)
        self.module = on_device(model, self.device)
        for unit in shard_units(self.module):
            fully_shard(unit, mesh=mesh, mp_policy=unit_policy)
        fully_shard(self.module, mesh=mesh, mp_policy=root_policy)
        self.model = self.module
        self.optimizer = make_optimizer([p for p in self.module.parameters() if p.requires_grad], self.cfg)
        self.scaler = _LossScaler(enabled=precision == "fp16")
        self._unscaled = False

    # ------------------------------------------------------------------ one step
    def forward(self, *args, **kwargs) -> Tensor:
        """A forward without autograd (validation) is resharded at once: FSDP2 keeps the root unit's
        parameters gathered after its forward for the backward that would follow, and with none coming
        they stayed full, plain tensors, and gather_full_state() took the EMA shards for full tensors
        (a 2-rank run with val_every and sample_every crashed there: tests/test_elastic_checkpoint.py)."""
        out = self.model(*args, **kwargs)
        if not torch.is_grad_enabled():
            self.module.reshard()
        return out

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts parameters and inputs

    def backward(self, loss: Tensor) -> None:
        (loss * self.scaler.scale if self.scaler.enabled else loss).backward()

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _local_grads(self) -> list[Tensor]:
        grads = []
        for p in self._trainable():
            if p.grad is not None:
                g = p.grad
                grads.append(g.to_local() if isinstance(g, DTensor) else g)
        return grads

    def clip_grad_norm(self, max_norm: float) -> float:
        grads = self._local_grads()
        if self.scaler.enabled and not self._unscaled and grads:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        self._unscaled = True
        # every parameter is a dim-0-sharded DTensor after fully_shard(root): local shards are disjoint
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            if g.numel():
                sq += g.detach().double().pow(2).sum()
        if self.dist.world_size > 1:
            dist.all_reduce(sq)
        norm = float(sq.sqrt())
        if max_norm > 0 and math.isfinite(norm):
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0 and grads:
                torch._foreach_mul_(grads, coef)
        return norm

    def optimizer_step(self) -> None:
        if self.scaler.enabled and not self._unscaled:
            self.clip_grad_norm(0.0)
        self.optimizer.step()
        self.scaler.stepped()
        self._unscaled = False

    def skip_step(self) -> None:
        self.scaler.skipped()
        self._unscaled = False
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._unscaled = False

    # ------------------------------------------------------------------ state
    def local_params(self) -> list[Tensor]:
        """This rank's shard of each trainable parameter (views: they follow optimizer updates)."""
        return [p.to_local() if isinstance(p, DTensor) else p for p in self._trainable()]

    def unwrapped_model(self) -> nn.Module:
        return self.module  # still sharded: use gather_full_state() for an unsharded copy

    def named_ema(self, ema: list[Tensor]) -> dict[str, Tensor]:
        """Each EMA shard as a DTensor with its parameter's sharding (views of the shadow), so DCP stores
        global offsets and another number of ranks, ddp or one process reads the slices it owns."""
        named = super().named_ema(ema)
        params = dict(self.module.named_parameters())
        return {n: _from_local_like(t, params[n]) for n, t in named.items()}

    def save(self, ckpt_dir: Path, ema: list[Tensor] | None = None, background: bool = False) -> Future:
        ckpt_dir = Path(ckpt_dir)
        written = dcp_state.save_strategy(self, ckpt_dir, ema, background)
        if self.dist.rank == 0:
            (ckpt_dir / SCALER_FILE).write_text(json.dumps(self.scaler.state_dict()))
        self.barrier()
        return written

    def load(self, ckpt_dir: Path, ema: list[Tensor] | None = None) -> bool:
        """Any single/ddp/fsdp DCP checkpoint, on any number of ranks (DCP reshards on read)."""
        ckpt_dir = Path(ckpt_dir)
        if not dcp_state.has_dcp(ckpt_dir):
            raise FileNotFoundError(
                f"{ckpt_dir}: no {DCP_DIR}/ directory. A single/ddp checkpoint from before DCP (model.pt) cannot "
                f"be sharded: resume it once with single/ddp (its next checkpoint is DCP), or export it "
                f"(python -m trainer.export) and start a new run with run.init_from=<the .safetensors>")
        found = dcp_state.load_strategy(self, ckpt_dir, ema)
        scaler_path = ckpt_dir / SCALER_FILE
        if scaler_path.is_file():  # fsdp's own; a single/ddp GradScaler state does not carry over
            self.scaler.load_state_dict(json.loads(scaler_path.read_text()))
        self.barrier()
        return found

    def gather_full_state(self, tensors: list[Tensor] | None = None) -> dict[str, Tensor] | None:
        """Collective. Unshards each parameter (or the given per-rank shards, e.g. EMA) on every rank
        and keeps the result on rank 0 only, one tensor at a time, so the peak is one full tensor."""
        trainable = {id(p) for p in self._trainable()}
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        if tensors is not None and len(tensors) != len(names):
            raise ValueError(f"gather_full_state: got {len(tensors)} tensors for {len(names)} parameters")
        replacement = dict(zip(names, tensors)) if tensors is not None else {}
        params = dict(self.module.named_parameters())
        out: dict[str, Tensor] = {}
        for key, value in self.module.state_dict().items():
            p = params.get(key)
            if p is not None and id(p) in trainable and key in replacement:
                value = _from_local_like(replacement[key], p)
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if self.dist.rank == 0:
                v = value.detach()
                out[key] = (v.float() if v.is_floating_point() else v).cpu().clone()
        return out if self.dist.rank == 0 else None


def _from_local_like(local: Tensor, param: Tensor) -> Tensor:
    """A DTensor with `param`'s sharding whose local shard is `local` (shards may be uneven)."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local.to(param.device, torch.float32), param.device_mesh, param.placements,
                              run_check=False, shape=param.shape, stride=param.stride())
