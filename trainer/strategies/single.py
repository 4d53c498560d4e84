"""One process holds the whole model: plain AdamW, autocast, and a GradScaler for fp16.

Also the base of DDP (trainer.strategies.ddp), which differs only in wrapping the module and in
skipping the gradient all-reduce on accumulation micro-steps; both keep full replicas. Checkpoints
are DCP keyed by parameter name (trainer.strategies.dcp_state), written once for all replicas, and
readable by fsdp on any number of ranks; the older model.pt/optimizer.pt files are still read.

Precision: parameters and optimizer state stay fp32; `run.precision` bf16/fp16 only sets the
autocast dtype of forward+loss. fp16 adds dynamic loss scaling (torch.amp.GradScaler), on CUDA and on
CPU alike (torch's CPU autocast and GradScaler both support fp16).
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import torch
from torch import Tensor, nn

from trainer.strategies import dcp_state
from trainer.strategies.base import Strategy, make_optimizer, on_device

MODEL_FILE = "model.pt"  # checkpoints written before DCP (still read)
OPTIM_FILE = "optimizer.pt"
SCALER_FILE = "scaler.pt"


class SingleStrategy(Strategy):
    name = "single"
    saves_ema = True  # in the DCP state, by parameter name: fsdp on any number of ranks reads it

    def setup(self, model: nn.Module) -> None:
        self.module = on_device(model, self.device)
        self.model = self._wrap(self.module)
        self.optimizer = make_optimizer(self.local_params(), self.cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.run.precision == "fp16")
        self._unscaled = False

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    # ------------------------------------------------------------------ one step
    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            self._unscaled = True
        grads = [p.grad for p in self.local_params() if p.grad is not None]
        if not grads:
            return 0.0
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.local_params(), max_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        return float(norm)

    def optimizer_step(self) -> None:
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._unscaled = False

    def skip_step(self) -> None:
        if self.scaler.is_enabled() and self._unscaled:
            self.scaler.update()  # records the overflow: the scale backs off
        self._unscaled = False
        self.zero_grad()

    # ------------------------------------------------------------------ state
    def local_params(self) -> list[Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def unwrapped_model(self) -> nn.Module:
        return self.module

    def save(self, ckpt_dir: Path, ema: list[Tensor] | None = None, background: bool = False) -> Future:
        """Model, AdamW state and EMA by parameter name in DCP (trainer.strategies.dcp_state), so fsdp on
        any number of ranks can resume it too; ddp replicas are written once. Scaler: rank 0."""
        ckpt_dir = Path(ckpt_dir)
        written = dcp_state.save_strategy(self, ckpt_dir, ema, background)
        if self.dist.rank == 0:
            torch.save(self.scaler.state_dict(), ckpt_dir / SCALER_FILE)
        self.barrier()
        return written

    def load(self, ckpt_dir: Path, ema: list[Tensor] | None = None) -> bool:
        ckpt_dir = Path(ckpt_dir)
        if dcp_state.has_dcp(ckpt_dir):
            found = dcp_state.load_strategy(self, ckpt_dir, ema)
        else:  # written before DCP: model.pt / optimizer.pt (+ ema-rank{r}.pt, read by the caller)
            self._load_torch_files(ckpt_dir)
            found = False
        self._load_scaler(ckpt_dir)
        self.barrier()
        return found

    def _load_torch_files(self, ckpt_dir: Path) -> None:
        self.module.load_state_dict(torch.load(ckpt_dir / MODEL_FILE, map_location=self.device, weights_only=True))
        self.optimizer.load_state_dict(torch.load(ckpt_dir / OPTIM_FILE, map_location=self.device,
                                                  weights_only=True))

    def _load_scaler(self, ckpt_dir: Path) -> None:
        """Only a single/ddp scaler file: another strategy's loss scale (fsdp's own) restarts here."""
        scaler_path = ckpt_dir / SCALER_FILE
        if scaler_path.exists():
            state = torch.load(scaler_path, weights_only=True)
            if state and self.scaler.is_enabled():  # a disabled scaler saves {}
                self.scaler.load_state_dict(state)

    def gather_full_state(self, tensors: list[Tensor] | None = None) -> dict[str, Tensor] | None:
        if self.dist.rank != 0:
            return None
        return full_state(self.module, tensors)


def full_state(module: nn.Module, tensors: list[Tensor] | None = None) -> dict[str, Tensor]:
    """fp32 CPU state dict of an unsharded module; `tensors` (parallel to its trainable parameters)
    replaces the parameter values, e.g. with EMA weights. Buffers are kept as they are."""
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
             for k, v in module.state_dict().items()}
    if tensors is not None:
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        if len(names) != len(tensors):
            raise ValueError(f"gather_full_state: got {len(tensors)} tensors for {len(names)} parameters")
        for name, t in zip(names, tensors):
            state[name] = t.detach().float().cpu().clone()
    return state

