"""DeepSpeed ZeRO stage 1, 2 or 3: optimizer state (1), + gradients (2), + parameters (3) partitioned.

The DeepSpeed config is built from our TrainConfig, optionally on top of a JSON file
(`parallel.deepspeed_config`, e.g. configs/deepspeed/zero3.json) so that tuning knobs (bucket
sizes, overlap_comm, persistence thresholds, fp16 loss-scale window, ...) live in the JSON while
everything our loop depends on (batch sizes, accumulation, clipping, stage, precision, optimizer
hyper-parameters) always comes from TrainConfig: see `build_ds_config`.

Everything beyond DeepSpeed's public API (ZeRO optimizer and parameter internals, the universal
checkpoint converter, overrides scoped to one engine object and one call) goes through trainer/strategies/deepspeed_compat.py, which checks
the installed version against the tested range and names any internal that is missing.

Facts this file relies on (DeepSpeed 0.19, checked on CPU with gloo):
- The optimizer is DeepSpeed's own `AdamW` with `"torch_adam": true` by default, i.e. torch.optim.AdamW
  on the partitioned fp32 master weights; FusedAdam/CPUAdam would compile C++ for minutes (set
  `torch_adam: false` in the JSON on GPU machines that have a compiler, if you want them).
- `deepspeed.init_distributed` compiles a shared-memory op (~1 min on 2 cores) that only inference
  all-reduce uses; it is marked incompatible before init so it is never built.
- bf16/fp16 turn the module itself into bf16/fp16, so `forward` casts floating activations (tensors
  of 2+ dims) to the module's dtype and returns fp32 (the diffusion loss is computed in fp32).
  Per-sample scalars ([B], the log-SNR) stay fp32: bf16 would round λ by up to 0.06, and the model
  computes its λ embedding in fp32 and casts only the features.
- The engine computes the grad norm, clips and skips non-finite steps inside `engine.step()`; the loop
  wants the norm *before* stepping, so `clip_grad_norm` evaluates the same norm function the engine
  will use and hands that value to the step (computed once); `skip_step` makes the engine take its
  own overflow path (no update, gradients dropped, fp16 loss scale backed off) and checks that it did
  (the engine's skipped-step count moved, `was_step_applied()` is False), raising if not.

EMA shards: under ZeRO-3 each rank's trainable tensors are its fp32 master partitions
(`compat.local_fp32_param`); under ZeRO-1/2 they are the fragments of the fp32 master that this rank's
optimizer owns (`compat.fragment`). Either way EMA memory divides by the world size, and
`gather_full_state` reassembles full fp32 tensors from any such list (live weights or EMA).

Another world size or ZeRO stage: `load` converts the checkpoint once to DeepSpeed's universal
checkpoint (`ds_to_universal` into `<ckpt>/deepspeed_universal/`), loads it with the engine's
universal-checkpoint flag switched on for that one call, and re-cuts the EMA from every saved
rank's fragments (`join_pieces`, then this rank's fragment/partition).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.precision import precision_dtype
from trainer import async_write
from trainer.checkpoint import is_complete, read_state, saved_zero_stage
from trainer.strategies import deepspeed_compat as compat
from trainer.strategies.base import Strategy, on_device
from trainer.strategies.process_group import ensure_process_group

log = logging.getLogger(__name__)

TAG = "deepspeed"  # engine.save_checkpoint(<ckpt_dir>, tag=TAG) -> <ckpt_dir>/deepspeed/
UNIVERSAL_TAG = "deepspeed_universal"  # its universal-checkpoint conversion, made on a topology change


def saved_topology(ckpt_dir: Path) -> tuple[int, int] | None:
    """(world size, ZeRO stage) of the run that wrote the checkpoint (its trainer_state.json); None for
    an engine checkpoint without one (a strategy saved on its own, e.g. tests/strategy_driver.py)."""
    if not is_complete(Path(ckpt_dir)):
        return None
    state = read_state(ckpt_dir)
    return int(state.get("world_size", 1)), saved_zero_stage(state, 0)


def join_pieces(pieces: list[Tensor], numel: int, stage: int) -> Tensor:
    """The flat fp32 tensor from the per-rank pieces of one parameter, in rank order: ZeRO-3 padded
    partitions (cut to `numel`), or ZeRO-1/2 fragments (contiguous in rank order, empty where a rank
    owned none of it)."""
    flat = torch.cat([p.reshape(-1).float() for p in pieces])
    if stage == 3:
        return flat[:numel]
    if flat.numel() != numel:
        raise ValueError(f"ZeRO-{stage} EMA fragments hold {flat.numel()} values for a parameter of {numel}")
    return flat


def convert_to_universal(src: Path, target: Path) -> None:
    """deepspeed.checkpoint.ds_to_universal (a process of its own, no worker pool), into target atomically."""
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    compat.ds_to_universal(str(src), str(tmp))
    os.replace(tmp, target)


def deep_merge(base: dict, override: dict) -> dict:
    """`override` wins key by key, recursing into nested dicts."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_json_config(path: str) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"parallel.deepspeed_config: {path} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"parallel.deepspeed_config: {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"parallel.deepspeed_config: {path} must hold a JSON object")
    return data


def build_ds_config(cfg, world_size: int, on_cpu: bool) -> dict:
    """JSON (if any) overlaid with the settings the training loop owns.

    Ignored from the JSON, with a warning: `scheduler` (trainer.lr sets the lr every step) and the
    batch-size keys (from data.batch_size, optim.grad_accum and the world size).
    """
    user = load_json_config(cfg.parallel.deepspeed_config)
    for key in ("scheduler", "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in user:
            log.warning("deepspeed config %s: %r is ignored (set by the trainer config)",
                        cfg.parallel.deepspeed_config, key)
            user.pop(key)
    stage = cfg.parallel.zero_stage
    if stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 1, 2 or 3, got {stage}")
    json_stage = (user.get("zero_optimization") or {}).get("stage")
    if json_stage is not None and json_stage != stage:
        log.warning("deepspeed config %s says ZeRO stage %s; using parallel.zero_stage=%s",
                    cfg.parallel.deepspeed_config, json_stage, stage)
    precision = cfg.run.precision
    o = cfg.optim
    user_opt_params = (user.get("optimizer") or {}).get("params") or {}
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": cfg.data.batch_size * o.grad_accum * world_size,
        "gradient_clipping": float(o.grad_clip),
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            # torch's AdamW unless the JSON asks otherwise; always on CPU (no C++ build)
            "torch_adam": True if on_cpu else bool(user_opt_params.get("torch_adam", True)),
        }},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if precision == "bf16":
        ours["bf16"]["check_grad_overflow"] = True  # a NaN/Inf step is skipped, never applied
    if cfg.parallel.offload_optimizer:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    user_type = str((user.get("optimizer") or {}).get("type", "AdamW"))
    if user_type.lower() != "adamw":
        raise ValueError(f"deepspeed config {cfg.parallel.deepspeed_config}: optimizer type {user_type!r} is not "
                         "supported; the trainer's optimizer is AdamW (optim.*)")
    return deep_merge(user, ours)


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def setup(self, model: nn.Module) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        # DeepSpeed reads these itself; torchrun sets them, a plain one-process run or srun may not
        for key, value in (("LOCAL_RANK", self.dist.local_rank), ("RANK", self.dist.rank),
                           ("WORLD_SIZE", self.dist.world_size)):
            os.environ.setdefault(key, str(value))
        ensure_process_group(self.dist, "deepspeed")
        compat.check_version()
        compat.skip_shm_op_build()
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if self.cfg.run.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise ValueError(f"run.precision=fp16 with deepspeed needs a GPU: DeepSpeed's "
                             f"{get_accelerator().device_name()} accelerator supports only bf16 and fp32")

        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.ds_config = build_ds_config(self.cfg, self.dist.world_size, on_cpu=self.device.type == "cpu")
        self.stage = self.ds_config["zero_optimization"]["stage"]
        model = on_device(model, self.device)
        # bf16/fp16: the engine casts the module first and copies its fp32 master from the cast
        # weights, i.e. the initial weights would be rounded to 8 mantissa bits; keep the originals
        initial = ({n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()}
                   if self.cfg.run.precision != "fp32" else None)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config, dist_init_required=False)
        self.engine = engine
        self._norm_parts = None  # clip_grad_norm's norm, reused by the step that follows
        compat.load_checkpoints_weights_only(engine)
        self.model = engine
        self.module = engine.module
        self.optimizer = optimizer  # the ZeRO optimizer; param_groups proxy the inner AdamW's
        self.dtype = precision_dtype(self.cfg.run.precision)
        self._params = [p for p in self.module.parameters() if p.requires_grad]
        self._names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        if initial is not None:
            self._restore_fp32_master(initial)

    @torch.no_grad()
    def _restore_fp32_master(self, initial: dict[str, Tensor]) -> None:
        if self.stage != 3:
            for name, p in zip(self._names, self._params):
                compat.set_full_fp32_param(p, initial[name].to(p.device))
            return
        # ZeRO-3: write our slice of each flat parameter into the local fp32 partition ourselves
        # (DeepSpeed 0.19's set_full_hp_param overruns when the last rank's partition is padded)
        for name, p in zip(self._names, self._params):
            local = compat.fp32_partition(self.optimizer, p)  # a view, even offloaded
            flat = initial[name].reshape(-1)
            part = compat.zero3_layout(p).partition_numel
            start = self.dist.rank * part
            n = max(0, min(part, flat.numel() - start))
            if n:
                local.narrow(0, 0, n).copy_(flat.narrow(0, start, n).to(local.device))

    # ------------------------------------------------------------------ one step
    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine holds the module in the training dtype

    def forward(self, *args, **kwargs) -> Tensor:
        out = self.engine(*self._cast(args), **self._cast(kwargs))
        return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out

    def _cast(self, value):
        if isinstance(value, Tensor):
            return value.to(self.dtype) if value.is_floating_point() and value.ndim > 1 else value
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v) for v in value)
        if isinstance(value, dict):
            return {k: self._cast(v) for k, v in value.items()}
        return value

    def backward(self, loss: Tensor) -> None:
        # the loop already divided by grad_accum; the engine must not divide again
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances the engine's micro-step counter

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global norm `engine.step()` is about to clip to `max_norm` (the engine clips; 0 = off),
        computed once: the step reuses it (compat.step_takes_grad_norm)."""
        compat.set_clip(self.optimizer, max_norm)
        self._norm_parts = compat.grad_norm_parts(self.optimizer, self.stage)
        return compat.grad_norm_value(self._norm_parts, self.optimizer, self.stage)

    def optimizer_step(self) -> None:
        parts, self._norm_parts = self._norm_parts, None
        with (compat.step_takes_grad_norm(self.optimizer, self.stage, parts) if parts is not None
              else contextlib.nullcontext()):
            self.engine.step()

    def skip_step(self) -> None:
        """Let the engine take its overflow path: no update, partitioned grads dropped, fp16 scale
        backed off. Forced by reporting an invalid norm for this one step, so a step whose loss was
        non-finite but whose gradients happened to be finite is dropped as well; then checked: a step
        DeepSpeed applied anyway raises (compat.NonFiniteStepApplied) instead of being trained on."""
        self._norm_parts = None
        skipped = compat.skipped_steps(self.engine)
        with compat.invalid_grad_norm(self.optimizer, self.stage):
            self.engine.step()
        compat.check_step_skipped(self.engine, skipped)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    # ------------------------------------------------------------------ state
    def local_params(self) -> list[Tensor]:
        """fp32 master weights this rank owns: ZeRO-3 partitions, or ZeRO-1/2 optimizer fragments
        (empty where this rank owns no part of a parameter)."""
        if self.stage == 3:
            return [compat.local_fp32_param(p) for p in self._params]
        out = []
        for p in self._params:
            piece = compat.fragment(p)
            out.append(piece if piece is not None else torch.empty(0, dtype=torch.float32, device=p.device))
        return out

    def unwrapped_model(self) -> nn.Module:
        return self.module  # ZeRO-3 parameters are partitioned: use gather_full_state()

    def save(self, ckpt_dir: Path, ema: list[Tensor] | None = None, background: bool = False) -> Future:
        """Engine files only; the EMA fragments go to ema-rank{r}.pt (saves_ema is False). `background`:
        every file the engine writes is staged and written by a thread instead (DeepSpeed has no async
        save of its own that runs without its NVMe I/O op). Synchronously, every file goes through
        `async_write.FailureCollector`: a write that fails (a full disk, often on one rank only) must not
        raise inside the engine, whose barriers the other ranks would then wait at forever; the failure
        comes back in the future instead, and trainer.checkpoint decides on every rank together."""
        writer = (async_write.BackgroundWriter(self.background_host_copies()) if background
                  else async_write.FailureCollector())
        with compat.checkpoint_writes_through(self.engine, writer.save, writer.fail):
            self.engine.save_checkpoint(str(ckpt_dir), tag=TAG, client_state={}, save_latest=False)
        self.barrier()
        return writer.finished()

    def load(self, ckpt_dir: Path, ema: list[Tensor] | None = None) -> bool:
        """The engine state; on another world size or ZeRO stage through DeepSpeed's universal checkpoint
        (converted once, kept beside the original), and then the EMA too (re-sliced from every saved
        rank's fragments; same topology: False, trainer.checkpoint reads this rank's ema-rank{r}.pt)."""
        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / TAG).is_dir():
            raise FileNotFoundError(f"{ckpt_dir}: no {TAG}/ directory; not a deepspeed checkpoint "
                                    f"(strategies cannot read each other's checkpoints; use trainer.export)")
        saved = saved_topology(ckpt_dir)
        universal = saved is not None and saved != (self.dist.world_size, self.stage)
        tag = self._universal_tag(ckpt_dir) if universal else TAG
        with compat.universal_checkpoint_loading(self.engine, ckpt_dir / tag if universal else None):
            path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"deepspeed could not load the checkpoint in {ckpt_dir}/{tag}")
        if universal and ema is not None:
            self._load_resharded_ema(ckpt_dir, *saved, ema)
        self.barrier()
        return universal and ema is not None

    def _universal_tag(self, ckpt_dir: Path) -> str:
        """Rank 0 converts <ckpt>/deepspeed into <ckpt>/deepspeed_universal once (into a temporary
        directory, renamed when complete, so a kill leaves no half conversion); all ranks wait."""
        target = ckpt_dir / UNIVERSAL_TAG
        if self.dist.rank == 0 and not target.is_dir():
            convert_to_universal(ckpt_dir / TAG, target)
        self.barrier()
        return UNIVERSAL_TAG

    @torch.no_grad()
    def _load_resharded_ema(self, ckpt_dir: Path, saved_world: int, saved_stage: int, ema: list[Tensor]) -> None:
        """Every saved rank's EMA pieces, joined into full tensors, then cut to this rank's pieces."""
        saved = [torch.load(ckpt_dir / f"ema-rank{r}.pt", weights_only=True, map_location="cpu")
                 for r in range(saved_world)]
        for i, (p, local) in enumerate(zip(self._params, ema)):
            numel = compat.full_numel(p, self.stage)  # ZeRO-3 parameters are empty placeholders
            full = join_pieces([pieces[i] for pieces in saved], numel, saved_stage)
            self._cut_piece(p, full, local)

    def _cut_piece(self, p: nn.Parameter, full: Tensor, local: Tensor) -> None:
        """local <- this rank's piece of the flat fp32 tensor `full` (the layout of local_params())."""
        if self.stage == 3:
            part = local.numel()
            start = self.dist.rank * part
            n = max(0, min(part, full.numel() - start))
            local.zero_()
            local.view(-1).narrow(0, 0, n).copy_(full.narrow(0, start, n).to(local.device))
            return
        span = compat.fragment_span(p)
        if span is not None:
            local.view(-1).copy_(full.narrow(0, *span).to(local.device))

    def gather_full_state(self, tensors: list[Tensor] | None = None) -> dict[str, Tensor] | None:
        """Collective: full fp32 tensors on rank 0 from per-rank pieces (the live fp32 master, or the
        given list parallel to local_params(), e.g. EMA), one parameter at a time."""
        pieces = self.local_params() if tensors is None else tensors
        if len(pieces) != len(self._params):
            raise ValueError(f"gather_full_state: got {len(pieces)} tensors for {len(self._params)} parameters")
        full: dict[str, Tensor] = {}
        for name, p, piece in zip(self._names, self._params, pieces):
            value = self._assemble(p, piece.detach().float())
            if self.dist.rank == 0:
                full[name] = value.cpu().clone()
        if self.dist.rank != 0:
            return None
        # buffers (never partitioned) and frozen parameters, in the module's key order
        out: dict[str, Tensor] = {}
        for key, value in self._plain_state().items():
            out[key] = full.get(key, value)
        return out

    def _plain_state(self) -> dict[str, Tensor]:
        names = set(self._names)
        keys = list(self.module.state_dict().keys()) if self.stage != 3 else \
            [n for n, _ in self.module.named_parameters()] + [n for n, _ in self.module.named_buffers()]
        buffers = dict(self.module.named_buffers())
        state: dict[str, Tensor] = {}
        for key in keys:
            if key in names:
                state[key] = torch.empty(0)  # placeholder, replaced by the gathered tensor
            elif key in buffers:
                b = buffers[key].detach()
                state[key] = (b.float() if b.is_floating_point() else b).cpu().clone()
        return state

    def _assemble(self, p: nn.Parameter, piece: Tensor) -> Tensor:
        world = self.dist.world_size
        if self.stage == 3:
            layout = compat.zero3_layout(p)
            part = layout.partition_numel  # padded, the same on every rank
            piece = piece.reshape(-1).to(layout.device)
            if piece.numel() != part:
                raise ValueError(f"ZeRO-3 piece has {piece.numel()} elements, partition size is {part}")
            if world == 1:
                flat = piece
            else:
                bufs = [torch.empty_like(piece) for _ in range(world)]
                dist.all_gather(bufs, piece)
                flat = torch.cat(bufs)
            return flat[: layout.numel].view(layout.shape)
        # ZeRO-1/2: disjoint fragments of the flattened parameter; sum of zero-padded pieces
        flat = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        span = compat.fragment_span(p)
        if span is not None:
            flat.narrow(0, *span).copy_(piece.reshape(-1))
        if world > 1:
            dist.all_reduce(flat)
        return flat.view(p.shape)
