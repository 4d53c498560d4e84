"""What a run reports: TensorBoard scalars/videos (rank 0 only) and a compact console progress line.

Tags (see docs/trainer.md): train/loss, train/loss_band/<band>, train/lr, train/grad_norm,
train/skipped_steps, train/rollbacks, perf/samples_per_s, perf/videos_per_s, perf/step_time_s,
perf/data_wait_s (max over ranks), perf/peak_mem_gb (max over ranks), perf/model_tflops_per_s and
perf/hardware_tflops_per_s (rank 0's, trainer.perf), perf/mfu (model TFLOP/s over the device's peak),
perf/loader_to_consumption (once, from the start-up loader probe), val/loss (weighted like training),
val/loss_band_mean, val/loss_band/<band>,
samples/<i> (animated). Loss per log-SNR band shows which noise levels the model is still bad at,
which the mean loss hides (high-SNR bands dominate nothing, low-SNR bands everything).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

BAND_WIDTH = 5.0


def band_edges(logsnr_min: float, logsnr_max: float, width: float = BAND_WIDTH) -> list[float]:
    n = max(1, int(math.ceil((logsnr_max - logsnr_min) / width - 1e-9)))
    return [logsnr_min + i * width for i in range(n)] + [logsnr_max]


def band_labels(edges: list[float]) -> list[str]:
    return [f"lsnr_{edges[i]:+g}_{edges[i + 1]:+g}" for i in range(len(edges) - 1)]


def band_centers(edges: list[float]) -> list[float]:
    return [(edges[i] + edges[i + 1]) / 2 for i in range(len(edges) - 1)]


def band_training_weights(edges: list[float], t_of_logsnr) -> list[float]:
    """Probability that training (t ~ U[0, 1]) draws a log-SNR in each band: |t(lo) - t(hi)|.

    Validation evaluates every band at its centre; weighting the band losses by these numbers
    makes `val/loss` a stratified estimate of the training objective, so it is directly
    comparable to `train/loss` (a plain mean over bands would overweight the extreme bands, where
    v/eps losses sit near their ceilings, and read several times higher).
    """
    t = [float(t_of_logsnr(torch.tensor(e, dtype=torch.float64))) for e in edges]
    weights = [abs(t[i] - t[i + 1]) for i in range(len(edges) - 1)]
    total = sum(weights)
    return [w / total for w in weights]


def band_index(logsnr: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """Band of each λ; values on the upper edge belong to the last band."""
    inner = torch.tensor(edges[1:-1], dtype=torch.float32)
    return torch.bucketize(logsnr.detach().float().cpu(), inner, right=True)


class BandAccumulator:
    """Sum and count of per-sample losses per log-SNR band over a logging interval."""

    def __init__(self, edges: list[float]):
        self.edges = edges
        self.labels = band_labels(edges)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.labels), dtype=torch.float64)
        self.counts = torch.zeros(len(self.labels), dtype=torch.float64)

    def add(self, per_sample: torch.Tensor, logsnr: torch.Tensor) -> None:
        idx = band_index(logsnr, self.edges)
        vals = per_sample.detach().double().cpu()
        self.sums.index_add_(0, idx, vals)
        self.counts.index_add_(0, idx, torch.ones_like(vals))

    def reduced(self, strategy) -> dict[str, float]:
        """Mean loss per band over all ranks (bands nobody sampled are left out)."""
        world = strategy.dist.world_size
        out = {}
        for i, label in enumerate(self.labels):
            total = strategy.all_reduce_mean(float(self.sums[i])) * world
            count = strategy.all_reduce_mean(float(self.counts[i])) * world
            if count > 0:
                out[label] = total / count
        return out


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def progress_line(step: int, total: int, loss: float, lr: float, it_per_s: float, data_frac: float,
                  skipped: int, tflops: float | None = None, mfu: float | None = None) -> str:
    """tflops: model TFLOP/s of this rank; mfu: that over the device's peak (None = not known)."""
    eta = (total - step) / it_per_s if it_per_s > 0 else float("nan")
    perf = ""
    if tflops is not None:
        perf = f" | {tflops:.3g} TFLOP/s" + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
    extra = f" | skipped {skipped}" if skipped else ""
    return (f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {it_per_s:.2f} it/s{perf} | "
            f"data {100 * data_frac:.0f}% | ETA {format_eta(eta)}{extra}")


STOPS = "the run stops rather than train on without a record (free space and rerun to resume from the latest checkpoint)"


class Metrics:
    """TensorBoard writer + console output; a no-op on ranks other than 0.

    A write that fails (a full disk) is not raised where it happens, in the middle of a collective step
    on rank 0 only: the first one is kept in `fault` (a trainer.storage.StorageFault naming the path and
    the cause), further writes are dropped, and the loop stops every rank at its next check."""

    def __init__(self, out_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.log_dir = Path(out_dir) / "tb"
        self._writer = None
        self._t0 = time.time()
        self.fault = None  # trainer.storage.StorageFault of the first write that failed

    def record_fault(self, what: str, path: str | Path, error: BaseException) -> None:
        from trainer.storage import write_failed

        if self.fault is None:
            self.fault = write_failed(what, path, error, STOPS)

    @property
    def writer(self):
        if self._writer is None and self.enabled and self.fault is None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread()
            self._writer = SummaryWriter(str(self.log_dir))
        return self._writer

    def _tb(self, write) -> None:
        """One TensorBoard write; its writer thread's failure surfaces at the next call as that OSError."""
        if not self.enabled or self.fault is not None:
            return
        try:
            write(self.writer)
        except OSError as e:
            self.record_fault("TensorBoard events to", self.log_dir, e)

    def scalars(self, values: dict[str, float], step: int) -> None:
        def write(w) -> None:
            for tag, value in values.items():
                w.add_scalar(tag, float(value), step)

        self._tb(write)

    def video(self, tag: str, frames, step: int, fps: float | None = None, upscale: int = 1) -> None:
        """An animated sample; fps None: trainer.video_io.OUTPUT_FPS (imported here: PIL and PyAV load
        only when a run writes videos)."""
        if not self.enabled:
            return
        from trainer.video_io import OUTPUT_FPS, video_summary

        summary = video_summary(tag, frames, OUTPUT_FPS if fps is None else fps, upscale)
        self._tb(lambda w: w.file_writer.add_summary(summary, step))

    def text(self, tag: str, text: str, step: int) -> None:
        self._tb(lambda w: w.add_text(tag, text, step))

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def flush(self) -> None:
        if self._writer is not None:
            self._tb(lambda w: w.flush())

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as e:
                self.record_fault("TensorBoard events to", self.log_dir, e)
            self._writer = None


class StepLog:
    """out_dir/train_log.jsonl, one JSON line per step (rank 0), line-buffered; a failed write is kept in
    `metrics.fault` like TensorBoard's."""

    def __init__(self, path: Path, metrics: Metrics):
        self.path, self.metrics = path, metrics
        self._file = None
        try:
            self._file = open(path, "a", buffering=1)
        except OSError as e:
            metrics.record_fault("the step log", path, e)

    def write(self, record: dict) -> None:
        if self._file is None or self.metrics.fault is not None:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:
            self.metrics.record_fault("the step log", self.path, e)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                self.metrics.record_fault("the step log", self.path, e)
            self._file = None


_hook_installed = False


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes from a thread of its own; on a full disk that thread dies printing a library
    traceback, and the same OSError reaches our next write call, which reports it in one line. Only
    that thread's out-of-space death is silenced; every other thread's exception prints as before."""
    import threading

    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True
    previous = threading.excepthook

    def hook(args) -> None:
        from trainer.storage import is_out_of_space

        thread = type(args.thread).__name__ if args.thread is not None else ""
        if "AsyncWriter" in thread and args.exc_value is not None and is_out_of_space(args.exc_value):
            return
        previous(args)

    threading.excepthook = hook
