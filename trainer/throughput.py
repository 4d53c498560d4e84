"""The run's performance probes, one component: the device's peak (logged at start-up), the model
FLOPs of a step (counted at the first batch's geometry), the start-up loader probe and its verdict at
the first log, and compilation (the first step's cost, recompiles after it).

Apart from the loop because none of it is a step: the loop hands each log interval to `scalars()`
and the first batch reaches `flops_hook()` through the batch hooks (trainer/batches.py), so the step
neither counts FLOPs nor knows compilation is on. Start-up logs that compare the plan with what the
run measures belong here too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable

from trainer.batches import BatchHook
from trainer.perf import BatchGeometry, StepFlops, peak_tflops
from trainer.seeding import preserved_rng
from trainer.step_control import Interval, TrainState


class _FirstBatchFlops(BatchHook):
    """Counts the step's FLOPs at the first batch that reaches it (start-up work, not step time)."""

    counts_as_step_time = False

    def __init__(self, throughput: Throughput):
        self.throughput = throughput

    def __call__(self, batch: dict) -> dict:
        if self.throughput.step_flops is None:
            self.throughput.count_flops(batch)
        return batch


class Throughput:
    """`strategy` provides the cross-rank max (all_reduce_max); `build_probe_loader()` a fresh training
    loader (throw-away: the run's own loader and its position are never touched); `compiled` what
    trainer.compile.compile_blocks returned, or None."""

    def __init__(self, cfg, device, metrics, state: TrainState, strategy, *, compiled=None,
                 build_probe_loader: Callable | None = None):
        self.cfg, self.device, self.metrics, self.state, self.strategy = cfg, device, metrics, state, strategy
        self.compiled = compiled
        self._build_probe_loader = build_probe_loader
        self.step_flops: StepFlops | None = None
        self.peak_tflops, source = peak_tflops(device, cfg.run.precision, cfg.run.peak_tflops)
        metrics.print(f"[perf] peak {self.peak_tflops:g} TFLOP/s per device from {source}"
                      if self.peak_tflops else f"[perf] perf/mfu not logged: {source}")
        self._loader_rate: float | None = None  # clips/s of the start-up loader probe (nan: probe failed)

    # ------------------------------------------------------------------ FLOPs
    def flops_hook(self) -> BatchHook:
        return _FirstBatchFlops(self)

    def count_flops(self, batch: dict) -> None:
        """Model and hardware FLOPs of one optimizer step at this batch's geometry (meta device, no
        compute; trainer.perf). Later batches may have other caption lengths: the text tokens are a
        small share of the work, so the first batch stands for the run."""
        accum = self.cfg.optim.grad_accum
        geometry = BatchGeometry.of_batch(batch)
        with preserved_rng():  # building a model (on meta) must not shift the training RNG (exact resume)
            self.step_flops = f = StepFlops.count(self.cfg.model, geometry, accum)
        recompute = (f"; hardware {f.hardware / 1e9:.4g} GFLOP with checkpoint policy {f.policy} "
                     f"(+{100 * (f.hardware / f.model - 1):.1f}% recompute)" if f.policy != "none" else "")
        self.metrics.print(f"[perf] model FLOPs per optimizer step and rank: {f.model / 1e9:.4g} GFLOP "
                           f"(forward + backward, {accum} x micro-batch {geometry.describe()}){recompute}")
        self.metrics.text("perf/flops", json.dumps({"model_flops": f.model, "hardware_flops": f.hardware,
                                                    "policy": f.policy, "grad_accum": accum,
                                                    "geometry": dataclasses.asdict(geometry)}), self.state.step)

    # ------------------------------------------------------------------ loader
    def probe_loader(self) -> None:
        """Time `run.loader_probe_batches` batches from a second, throw-away loader (the run's own
        loader, its position and the RNG streams are untouched) → clips/s this rank's loader can
        deliver; compared with what training consumes at the first log (`scalars`)."""
        n = self.cfg.run.loader_probe_batches
        if n < 0:
            n = 8 if self.device.type == "cuda" else 0
        if n < 2 or self._build_probe_loader is None:
            return
        with preserved_rng():
            loader = self._build_probe_loader()
            it = iter(loader)
            clips, t0 = 0, None
            for i in range(n):
                batch = next(it, None)
                if batch is None:
                    break
                if i == 0:  # worker start-up is not throughput
                    t0 = time.perf_counter()
                    continue
                clips += int(batch["video"].shape[0])
            elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
            del it, loader
        # set on every rank alike (the check at the first log is collective); nan = nothing measured here
        self._loader_rate = clips / elapsed if clips and elapsed > 0 else float("nan")

    def _check_loader(self, interval: Interval, step_time: float, scalars: dict) -> None:
        """Once, at the first log: the loader's probed clips/s over the clips/s the step consumes when
        it never waits (compute time only). Below 1 the accelerator will wait for data (starved)."""
        compute = max(step_time - interval.wait / max(1, interval.steps), 1e-9)
        consumed = interval.videos / max(1, interval.steps) / compute  # clips/s on this rank
        rate = self._loader_rate
        self._loader_rate = None
        local = rate / consumed if math.isfinite(rate) else math.inf  # a rank that measured nothing: no vote
        ratio = -self.strategy.all_reduce_max(-local)  # the worst rank
        if not math.isfinite(ratio):
            self.metrics.print("[perf] loader probe measured nothing (fewer than 2 batches); no loader check")
            return
        scalars["perf/loader_to_consumption"] = ratio
        verdict = ("ok" if ratio >= 1.2 else "tight: little headroom" if ratio >= 1 else
                   "STARVED: the accelerator will wait for data; raise data.num_workers or use npy shards")
        self.metrics.print(f"[perf] loader delivers {rate:.1f} clips/s per rank, training consumes {consumed:.1f} "
                           f"(worst rank ratio {ratio:.2f}): {verdict}; perf/data_wait_s tracks it from here")

    # ------------------------------------------------------------------ compilation
    def after_step(self, seconds: float) -> None:
        """The first compiled step reports what compilation took."""
        c = self.compiled
        if c is not None and c.graphs_after_warmup is None:
            c.mark_warm(seconds)
            self.metrics.print(f"[compile] first step {seconds:.1f} s with compilation: {c.graphs()} graphs for "
                               f"{c.blocks} blocks (backend {c.backend})")

    # ------------------------------------------------------------------ the log interval
    def scalars(self, interval: Interval, step_time: float, scalars: dict) -> tuple[float | None, float | None]:
        """Adds perf/model_tflops_per_s, perf/mfu, the loader check and perf/recompiles to `scalars`
        (collective: every rank calls it at every log); returns (TFLOP/s, MFU) for the progress line."""
        tflops = mfu = None
        if self.step_flops is not None and step_time > 0:
            # per rank: this rank's FLOPs over its own mean step time (data wait included: MFU is
            # what the run achieves, not what the kernels could)
            tflops = self.step_flops.model / step_time / 1e12
            scalars["perf/model_tflops_per_s"] = tflops
            scalars["perf/hardware_tflops_per_s"] = self.step_flops.hardware / step_time / 1e12
            if self.peak_tflops:
                mfu = scalars["perf/mfu"] = tflops / self.peak_tflops
        if self._loader_rate is not None:
            self._check_loader(interval, step_time, scalars)
        if self.compiled is not None:
            scalars["perf/recompiles"] = new = self.compiled.new_graphs()
            if new:
                self.metrics.print(f"[compile] WARNING: {new} graphs compiled after the first step (recompilation: "
                                   f"a shape changed, e.g. the caption length); see TORCH_LOGS=recompiles")
        return tflops, mfu
