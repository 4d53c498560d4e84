"""Throughput accounting: model FLOPs of a training step, the accelerator's peak, MFU, and the
activation memory of a checkpoint policy.

Why count on the meta device: a step's FLOPs depend only on tensor shapes, so the U-Net is built
and run forward + backward on "meta" tensors under torch.utils.flop_counter.FlopCounterMode; no
arithmetic runs and no memory is allocated (about a second for the paper's small config), so the
trainer can afford it at start-up at the run's real batch geometry.

Two counts (the usual MFU / HFU split, as in the PaLM paper's appendix B):
- model FLOPs: forward + backward with activation checkpointing off. The work the model needs;
  MFU = model FLOP/s / peak, comparable across checkpoint policies and codebases.
- hardware FLOPs: the same with the run's checkpoint policy, recompute included. What the chip
  actually executes; always >= model FLOPs (equal for `none`, and for `selective`, whose recompute is
  elementwise work the counter does not count).

Only matmuls, convolutions and attention are counted (as every MFU figure does); norms,
activations and the optimizer are not.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from model.config import UNetConfig

aten = torch.ops.aten

# --------------------------------------------------------------------------------------- peaks
# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets. "tf32" is what an
# fp32 run gets on CUDA (the trainer allows TF32 matmuls for fp32 runs); "fp32" is plain FP32 math.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "MI300X": {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4},
}
# torch.cuda.get_device_name() -> table row; first match wins, so the specific forms come first
# (e.g. "NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3" = SXM, "NVIDIA H200", "AMD Instinct MI300X").
DEVICE_PATTERNS: list[tuple[str, str]] = [
    (r"H200.*NVL", "H200 NVL"),
    (r"H200", "H200 SXM"),
    (r"H100.*PCIe", "H100 PCIe"),
    (r"H100.*NVL", "H100 NVL"),
    (r"H100", "H100 SXM"),
    (r"A100", "A100"),
    (r"L40S", "L40S"),
    (r"MI300X", "MI300X"),
]


def known_accelerator(device_name: str) -> str | None:
    """The PEAK_TFLOPS row of a device name (None if it is not in the table)."""
    for pattern, row in DEVICE_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return row
    return None


def math_dtype(precision: str, tf32: bool) -> str:
    """The PEAK_TFLOPS column of a run: its autocast dtype, or tf32/fp32 for an fp32 run."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if tf32 else "fp32"


def peak_tflops(device: torch.device, precision: str, override: float = 0.0) -> tuple[float | None, str]:
    """(peak TFLOP/s per device or None, a sentence saying where it came from or why there is none).

    `override` (run.peak_tflops) wins; otherwise a CUDA/ROCm device found in PEAK_TFLOPS. CPUs and
    unknown accelerators have no table entry: their peak depends on cores, clocks and ISA, so the user
    must say it, and without it MFU is not logged (a wrong peak would make the number meaningless).
    """
    if override > 0:
        return float(override), f"run.peak_tflops = {override:g}"
    if device.type != "cuda":
        return None, (f"no peak FLOP/s for device {device.type!r}; set run.peak_tflops to log perf/mfu")
    name = torch.cuda.get_device_name(device)
    row = known_accelerator(name)
    if row is None:
        return None, f"{name!r} is not in trainer.perf.PEAK_TFLOPS; set run.peak_tflops to log perf/mfu"
    col = math_dtype(precision, torch.backends.cuda.matmul.allow_tf32)
    return PEAK_TFLOPS[row][col], f"{row} {col} dense peak ({name})"


# --------------------------------------------------------------------------------------- FLOPs
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_val=None, **kwargs) -> int:
    # FlopCounterMode has no formula for the CPU flash kernel: its cost is that of any fused SDPA
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_val=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# (FlopCounterMode hands custom formulas the arguments' shapes, as for its own registry)
EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the CPU flash-attention kernel (so CPU runs and meta agree)."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


@dataclass(frozen=True)
class BatchGeometry:
    """What one micro-batch looks like to the model: the shapes a step's FLOPs depend on."""

    batch: int  # clips per rank per micro-step
    frames: int  # video + image frames per clip
    num_video_frames: int
    height: int
    width: int
    text_len: int  # caption tokens (the loader pads to the longest caption of the batch)

    def describe(self) -> str:
        image = self.frames - self.num_video_frames
        return (f"{self.batch} x ({self.num_video_frames}{f' + {image} image' if image else ''}) frames x "
                f"{self.height}x{self.width}, {self.text_len} text tokens")

    @classmethod
    def of_batch(cls, batch: dict) -> BatchGeometry:
        b, _, f, h, w = batch["video"].shape
        return cls(batch=b, frames=f, num_video_frames=int(batch["num_video_frames"]), height=h, width=w,
                   text_len=int(batch["text_emb"].shape[1]))


def count_step_flops(model_cfg: UNetConfig, geometry: BatchGeometry, policy: str = "none") -> int:
    """FLOPs of one forward + backward of the U-Net on a micro-batch of `geometry`, with checkpoint
    `policy` ("none" = model FLOPs; the run's policy = hardware FLOPs, recompute included). Runs on
    the meta device: shapes only, no compute. The loss (a mean of squares) adds no counted FLOPs."""
    from model.unet import SpaceTimeUNet

    cfg = dataclasses.replace(model_cfg, checkpoint_policy=policy, gradient_checkpointing=False)
    g = geometry
    with torch.device("meta"):
        model = SpaceTimeUNet(cfg).train()
        z = torch.empty(g.batch, cfg.in_channels, g.frames, g.height, g.width)
        logsnr = torch.empty(g.batch)
        text = torch.empty(g.batch, g.text_len, cfg.text_dim)
        mask = torch.ones(g.batch, g.text_len, dtype=torch.bool)
    counter = flop_counter()
    with counter:
        out = model(z, logsnr, text, mask, num_video_frames=g.num_video_frames)
        out.float().square().mean().backward()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per optimizer step on one rank (all grad-accumulation micro-steps)."""

    model: int
    hardware: int
    geometry: BatchGeometry
    policy: str

    @classmethod
    def count(cls, model_cfg: UNetConfig, geometry: BatchGeometry, grad_accum: int = 1) -> StepFlops:
        policy = model_cfg.activation_checkpointing
        model = count_step_flops(model_cfg, geometry, "none")
        hardware = model if policy == "none" else count_step_flops(model_cfg, geometry, policy)
        return cls(model=model * grad_accum, hardware=hardware * grad_accum, geometry=geometry, policy=policy)


# --------------------------------------------------------------------------------------- memory
class ActivationMemory:
    """Bytes of tensors a training step keeps alive, measured by watching storages (works on meta).

    Use:  with ActivationMemory() as mem: loss = f(); (mem.retained() now) ... loss.backward()
    then  mem.retained_bytes (live after forward: what is kept for backward, by autograd, a
    checkpoint or a selective-checkpoint cache alike) and mem.peak_bytes (the most alive at once
    during forward and backward, gradients included). Only tensors created inside the context count,
    so parameters and inputs are excluded. Why not saved_tensors_hooks: a selective checkpoint keeps
    its saved op outputs in its own cache, which those hooks never see.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer._track(out)
                return out

        self._mode = _Mode()
        self._live: dict[int, tuple[object, int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.retained_bytes = 0

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current_bytes -= self._live.pop(k)[1]

    def _track(self, out) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        self._sweep()
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live:
                continue
            nbytes = storage.nbytes()
            self._live[key] = (StorageWeakRef(storage), nbytes)
            self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def retained(self) -> int:
        """Bytes alive now (call after forward, with only the loss held): the saved activations."""
        self._sweep()
        self.retained_bytes = self.current_bytes
        return self.retained_bytes

    def __enter__(self) -> ActivationMemory:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
