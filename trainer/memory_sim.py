"""Per-rank memory of a training step, by running the real step on fake tensors at any world size.

Why simulate instead of adding up a formula: what a rank holds at its peak depends on what the code
really does — FSDP2's unsharded units and their all-gather/reduce-scatter buffers, the mixed-precision
copies, which activations a checkpoint policy keeps, the optimizer's lazily created state. So the
model, the strategy's own `setup()` and two optimizer steps run under `FakeTensorMode` (shapes and
dtypes, no data, no memory) with torch's fake process group standing in for `world_size` ranks, and
`LiveBytes` watches every storage the step creates. Planning the 1.27B model for 512 ranks this way
takes seconds on a laptop CPU.

What cannot run on fake tensors is said, and computed instead (`MemoryBreakdown.sources`):
- DDP's C++ reducer touches real data, so DDP is the single-process step plus its gradient buckets
  (one more copy of the gradients: the trainer does not set gradient_as_bucket_view).
- DeepSpeed's engine does not run on fake tensors either: its model states come from the ZeRO paper's
  accounting (DeepSpeed's own `estimate_zero2/3_model_states_mem_needs`), its buckets from its config,
  and the activations from the simulated step of the unwrapped model.
- The grad-norm clip reads the norm as a Python float (data-dependent): it is skipped; its temporaries
  are one gradient at a time.

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
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose outputs are communication buffers (FSDP2's all-gather/reduce-scatter staging, c10d)
COMM_NAMESPACES = frozenset({"fsdp", "c10d", "_c10d_functional", "c10d_functional", "_dtensor"})
PHASES = ("step", "comm")


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
        self.phase = "step"
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
                self._add(t.untyped_storage(), phase)
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


def run_step(strategy, diffusion, ema, batch: dict, cfg, clip: bool = True) -> None:
    """One optimizer step as the training loop takes it (grad accumulation, caption dropout, the
    motion measurement of motion-conditioned models, EMA update); shared by the simulation and the
    measurement so both run the same ops. `clip=False` under fake tensors (the norm is data)."""
    from model.motion import global_motion

    accum = cfg.optim.grad_accum
    for micro in range(accum):
        x = batch["video"].to(strategy.device).float()
        cond = {"text_emb": batch["text_emb"].to(strategy.device),
                "text_mask": batch["text_mask"].to(strategy.device),
                "num_video_frames": int(batch["num_video_frames"])}
        if cfg.model.motion_conditioning:
            cond["motion"] = global_motion(x[:, :, :cond["num_video_frames"]])
        sync = strategy.no_sync() if micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with strategy.autocast():
                per_sample, _ = diffusion.loss_terms(strategy.forward, x, **cond)
            strategy.backward(per_sample.mean() / accum)
    if clip:
        strategy.clip_grad_norm(cfg.optim.grad_clip)
    strategy.optimizer_step()
    ema.update(strategy.local_params())
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


def model_state_bytes(strategy, ema) -> dict[str, int]:
    """Parameters (with buffers), optimizer state and EMA one rank holds, counted from the objects
    themselves: what the strategy keeps, whatever it allocated on the way."""
    module = strategy.unwrapped_model()
    optimizer_tensors = [v for state in strategy.optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor)]
    return {"parameters": storage_bytes([*module.parameters(), *module.buffers()]),
            "optimizer": storage_bytes(optimizer_tensors),
            "ema": storage_bytes(ema.shadow)}


def measure_step(strategy, diffusion, ema, batch: dict, cfg, clip: bool) -> MemoryBreakdown:
    """Breakdown of one more step of an already-stepped strategy: model states counted directly, the
    step's own bytes (gradients, activations, communication buffers) by `LiveBytes` around it. Runs on
    fake tensors (simulation) and real ones (trainer.memory_probe) alike."""
    states = model_state_bytes(strategy, ema)
    grads = _GradientWatch(strategy)
    mem = LiveBytes()
    with mem:
        mem.phase = "step"
        run_step(strategy, diffusion, ema, batch, cfg, clip=clip)
        mem.sync()
    transient = mem.peak
    comm = mem.peak_by_phase["comm"]
    gradients = grads.bytes
    return MemoryBreakdown(gradients=gradients, activations=max(0, transient - gradients - comm), comm=comm,
                           sources=dict.fromkeys(PARTS, "simulated"), **states)


PARTS = ("parameters", "gradients", "optimizer", "ema", "activations", "comm")


def simulate_step(cfg, world_size: int, batch: int | None = None, text_len: int = 77) -> SimulatedStep:
    """Per-rank memory of `cfg`'s training step at `world_size` ranks and micro-batch `batch` (default
    data.batch_size), by running it on fake tensors (module docstring): two optimizer steps, the
    second measured (AdamW creates its state in the first). Strategies: single, fsdp; ddp is single
    plus its buckets and deepspeed is computed (trainer.plan)."""
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
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            strategy.setup(SpaceTimeUNet(cfg.model).train())
            ema = EMA(strategy.local_params(), cfg.run.ema_decay)
            data = synthetic_batch(cfg, batch, text_len)
            run_step(strategy, diffusion, ema, data, cfg, clip=False)
            breakdown = measure_step(strategy, diffusion, ema, data, cfg, clip=False)
    finally:
        if name == "fsdp":
            dist.destroy_process_group()
    return SimulatedStep(breakdown, world_size, batch, name, cfg.model.activation_checkpointing)


class _GradientWatch:
    """Bytes of the gradients a step holds after its backward: read through a hook on the optimizer's
    step (the moment every gradient exists and none has been freed yet)."""

    def __init__(self, strategy):
        self.bytes = 0
        optimizer = strategy.optimizer
        self._handle = optimizer.register_step_pre_hook(self._measure)

    def _measure(self, optimizer, args, kwargs) -> None:
        seen: set[int] = set()
        total = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                local = g.to_local() if hasattr(g, "to_local") else g
                storage = local.untyped_storage()
                if storage._cdata not in seen:
                    seen.add(storage._cdata)
                    total += storage.nbytes()
        self.bytes = total
        self._handle.remove()
