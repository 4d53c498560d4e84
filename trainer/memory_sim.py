"""Per-rank memory of a training step, by running the real step on fake tensors at any world size.

Why simulate instead of adding up a formula: what a rank holds at its peak depends on what the code
really does — FSDP2's unsharded units and their all-gather/reduce-scatter buffers, the mixed-precision
copies, which activations a checkpoint policy keeps, the optimizer's lazily created state. So the
model, the strategy's own `setup()`, an optimizer step on zero gradients and a whole training step
run under `FakeTensorMode` (shapes and dtypes, no data, no memory) with torch's fake process group
standing in for `world_size` ranks, and `LiveBytes` watches every storage they create. One such
simulation of the 1.27B model takes 10-60 s on one CPU core, whatever the world size.

What cannot run on fake tensors is said, and computed instead (`MemoryBreakdown.sources`):
- DDP's C++ reducer touches real data, so DDP is the single-process step plus its gradient buckets
  (one more copy of the gradients: the trainer does not set gradient_as_bucket_view).
- DeepSpeed's engine does not run on fake tensors either: its model states come from the ZeRO paper's
  accounting (DeepSpeed's own `estimate_zero2/3_model_states_mem_needs`), its buckets from its config,
  and the activations from the simulated step of the unwrapped model.
- The grad-norm clip reads the norm as a Python float (data-dependent): it is skipped; its temporaries
  are one gradient at a time.
- The batch is shaped like the loader's with captions of data.max_text_len tokens (the loader pads to
  the longest caption of a batch, so this is the worst case).

The same `LiveBytes` counter runs around real steps (`trainer.memory_probe`), which is how the
simulation is checked against measurement (tests/test_plan_memory.py, BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

# ops whose outputs are communication buffers (FSDP2's all-gather/reduce-scatter staging, c10d)
COMM_NAMESPACES = frozenset({"fsdp", "c10d", "_c10d_functional", "c10d_functional", "_dtensor"})
PHASES = ("state", "step", "comm")


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive, with the peak and its breakdown.

    Every op's outputs are seen (fake or real tensors alike); a storage counts once, with its size
    now (FSDP2 frees and re-grows its unsharded parameters with `storage.resize_`, which is followed
    here). Each storage carries the `phase` current when it was created (or re-grown: those are
    communication buffers), so the peak can be split into parameters, EMA, optimizer state and what
    the step itself holds. Freed storages are noticed lazily (a weak reference expired): when the count
    passes the peak, it is swept (made exact) at most every `sweep_every` ops, and the peak is taken
    from the exact count only; so a peak is missed only if it lasts fewer than `sweep_every` ops.
    """

    def __init__(self, sweep_every: int = 8):
        super().__init__()
        self.phase = "state"
        self.sweep_every = sweep_every
        self._live: dict[int, list] = {}  # storage key -> [weak ref, bytes, phase]
        self.by_phase: dict[str, int] = dict.fromkeys(PHASES, 0)
        self.current = 0
        self.peak = 0
        self.peak_by_phase: dict[str, int] = dict(self.by_phase)
        self._ops_since_sweep = 0
        self._orig_resize = None

    # ------------------------------------------------------------------ counting
    def _add(self, storage, phase: str) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = [StorageWeakRef(storage), nbytes, phase]
        self.current += nbytes
        self.by_phase[phase] += nbytes

    def _sweep(self) -> None:
        for key in [k for k, entry in self._live.items() if entry[0].expired()]:
            _, nbytes, phase = self._live.pop(key)
            self.current -= nbytes
            self.by_phase[phase] -= nbytes
        self._ops_since_sweep = 0

    def _note_peak(self) -> None:
        self._ops_since_sweep += 1
        if self.current <= self.peak or self._ops_since_sweep < self.sweep_every:
            return
        self._sweep()
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_phase = dict(self.by_phase)

    def _resized(self, storage, nbytes: int) -> None:
        entry = self._live.get(storage._cdata)
        if entry is None:
            if nbytes:
                self._add(storage, "comm")
            return
        self.current += nbytes - entry[1]
        self.by_phase[entry[2]] -= entry[1]
        if nbytes > entry[1]:  # re-grown: an unsharded parameter's all-gather buffer
            entry[2] = "comm"
        self.by_phase[entry[2]] += nbytes
        entry[1] = nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        phase = "comm" if func.namespace in COMM_NAMESPACES else self.phase
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for storage in _storages(t):
                    self._add(storage, phase)
        self._note_peak()
        return out

    # ------------------------------------------------------------------ use
    def sync(self) -> int:
        """Exact bytes alive now. Collects garbage first: fully_shard leaves the unsharded parameters
        it replaced in reference cycles, which the run frees at its next collection anyway."""
        gc.collect()
        self._sweep()
        return self.current

    def reset_peak(self) -> None:
        self.sync()
        self.peak = self.current
        self.peak_by_phase = dict(self.by_phase)

    def __enter__(self):
        orig = self._orig_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, nbytes):
            result = orig(storage, nbytes)
            tracker._resized(storage, int(nbytes))
            tracker._note_peak()
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)


def _storages(t: torch.Tensor):
    """The storages that hold `t`'s data. A wrapper subclass (DTensor) reports a storage of its whole
    logical size but holds none: its inner (local) tensors do, and the ops that made them ran below
    this mode (a mode is off the stack while it handles an op), so they are taken from the wrapper."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
    else:
        yield t.untyped_storage()


@dataclass
class MemoryBreakdown:
    """Bytes one rank holds at the peak of a training step, in parts that add up to `peak`."""

    parameters: int
    gradients: int
    optimizer: int
    ema: int
    activations: int  # activations and temporaries at the peak (checkpoint policy's recompute included)
    comm: int  # communication buffers at the peak (FSDP2's unsharded units, DDP/ZeRO buckets)
    sources: dict[str, str] = field(default_factory=dict)  # part -> "simulated" or "computed: why"

    @property
    def peak(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.ema + self.activations + self.comm

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}


@dataclass(frozen=True)
class SimulatedStep:
    """What `simulate_step` saw: the breakdown, and the whole peak (`breakdown.peak` equals it)."""

    breakdown: MemoryBreakdown
    world_size: int
    batch: int
    strategy: str
    policy: str


# ------------------------------------------------------------------------------ the simulated step
def _fake_process_group(world_size: int) -> None:
    """torch's fake backend at `world_size` (collectives return at once, nothing is sent)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_world_size() == world_size and dist.get_backend() == "fake":
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def synthetic_batch(cfg, batch: int, text_len: int) -> dict:
    """A batch shaped like the loader's for `cfg.data` (values do not matter on fake tensors)."""
    d, m = cfg.data, cfg.model
    frames = d.num_frames + d.num_image_frames
    return {"video": torch.zeros(batch, m.in_channels, frames, d.image_size, d.image_size),
            "text_emb": torch.zeros(batch, text_len, m.text_dim),
            "text_mask": torch.ones(batch, text_len, dtype=torch.bool),
            "num_video_frames": d.num_frames}


def run_step(strategy, diffusion, ema, batch: dict, cfg, clip: bool = True, optimizer: bool = True,
             after_backward=None) -> None:
    """One optimizer step as the training loop takes it (grad accumulation, the loop's `Conditioning`:
    caption dropout and what the model measures on the clip, EMA update); shared by the simulation and the
    measurement so both run the same ops. `clip=False` under fake tensors (the norm is data);
    `optimizer=False`: forward and backward only; `after_backward()` is called once every gradient exists."""
    from trainer.builder import model_conditioning

    conditioning = model_conditioning(cfg, strategy.device)
    accum = cfg.optim.grad_accum
    for micro in range(accum):
        x = batch["video"].to(strategy.device).float()
        cond = conditioning.for_training(batch, x)
        model = conditioning.denoiser(strategy.forward)
        sync = strategy.no_sync() if micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with strategy.autocast():
                per_sample, _ = diffusion.loss_terms(model, x, **cond)
            strategy.backward((per_sample.mean() + model.weighted()) / accum)
    if after_backward is not None:
        after_backward()
    if optimizer:
        if clip:
            strategy.clip_grad_norm(cfg.optim.grad_clip)
        strategy.optimizer_step()
        ema.update(strategy.local_params())
    strategy.zero_grad()


def warm_up_optimizer(strategy) -> None:
    """An optimizer step on zero gradients, without forward or backward: AdamW creates its state in
    its first step, and the simulation needs that state without paying for a whole step."""
    for group in strategy.optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    strategy.optimizer_step()
    strategy.zero_grad()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors by their local shard)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def _allocate_unsharded_buffers(module) -> None:
    """FSDP2 allocates each unit's unsharded parameters at its first all-gather and from then on only
    re-grows and frees their storage: unshard/reshard every unit once, as the first step would, so the
    measured step sees them as the communication buffers they are."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.unshard()
            unit.reshard()


def _trainable(strategy) -> list:
    return [p for group in strategy.optimizer.param_groups for p in group["params"]]


PARTS = ("parameters", "gradients", "optimizer", "ema", "activations", "comm")


def simulate_step(cfg, world_size: int, batch: int | None = None, text_len: int = 77,
                  states: bool = True) -> SimulatedStep:
    """Per-rank memory of `cfg`'s training step at `world_size` ranks and micro-batch `batch` (default
    data.batch_size), by running it on fake tensors (module docstring): an optimizer step on zero
    gradients (AdamW creates its state in its first step), then a whole step, measured. `states=False`:
    forward and backward only, for the activations of a policy (the optimizer and EMA parts are then 0).
    Strategies: single, fsdp; ddp is single plus its buckets and deepspeed is computed (trainer.plan)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from model.diffusion import GaussianDiffusion
    from model.unet import SpaceTimeUNet
    from trainer.distributed import DistEnv
    from trainer.ema import EMA
    from trainer.strategies.base import build_strategy

    name = cfg.parallel.strategy
    if name not in ("single", "fsdp"):
        raise ValueError(f"simulate_step runs single and fsdp (ddp and deepspeed are built on them), not {name!r}")
    batch = batch or cfg.data.batch_size
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))
    cpu = torch.device("cpu")
    if name == "fsdp":
        _fake_process_group(world_size)
    strategy = build_strategy(cfg, DistEnv(0, world_size if name == "fsdp" else 1, 0, cpu, "fake"))
    if name == "fsdp":
        strategy.device_mesh()  # outside FakeTensorMode: mesh creation reads data
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    mem = LiveBytes()
    grads: list[int] = []
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), mem:
            mem.phase = "state"
            strategy.setup(SpaceTimeUNet(cfg.model).train())
            parameters = mem.sync()
            ema = EMA(strategy.local_params() if states else [], cfg.run.ema_decay)
            ema_bytes = mem.sync() - parameters
            if states:
                warm_up_optimizer(strategy)
            if name == "fsdp":
                _allocate_unsharded_buffers(strategy.module)
            optimizer = mem.sync() - parameters - ema_bytes  # AdamW's state and what the strategy keeps
            mem.phase = "step"
            data = synthetic_batch(cfg, batch, text_len)
            mem.reset_peak()
            base, base_comm = mem.current - mem.by_phase["step"], mem.by_phase["comm"]
            run_step(strategy, diffusion, ema, data, cfg, clip=False, optimizer=states,
                     after_backward=lambda: grads.append(storage_bytes(p.grad for p in _trainable(strategy))))
            mem.sync()
    finally:
        if name == "fsdp":
            dist.destroy_process_group()
    comm = mem.peak_by_phase["comm"] - base_comm
    transient = mem.peak - base  # the step's own bytes at its peak, the batch included
    breakdown = MemoryBreakdown(parameters=parameters, gradients=grads[0], optimizer=optimizer, ema=ema_bytes,
                                activations=max(0, transient - grads[0] - comm), comm=comm,
                                sources=dict.fromkeys(PARTS, "simulated"))
    return SimulatedStep(breakdown, world_size, batch, name, cfg.model.activation_checkpointing)
