"""The training loop: one loop for every strategy, with exact resume, EMA, NaN guard and monitoring.

What it guarantees (tests/test_trainer_*.py check each):
- Resume is automatic and exact: a run whose out_dir holds a checkpoint continues from it, and on CPU
  its per-step losses are bitwise those of an uninterrupted run (data position, RNG of every rank,
  optimizer/scaler state and EMA are restored; the LR is a pure function of the step).
- The data is elastic: each train_log.jsonl line carries `batch_digest` (the step's global batch), the
  same for any number of ranks or loader workers at the same global batch; single/ddp checkpoints
  resume on another process count, continuing at the next global sample.
- SIGUSR1/SIGTERM: the current step finishes, a checkpoint is written, and `train()` returns
  EXIT_REQUEUE (common/exit_codes.py) so a scheduler wrapper knows to requeue the job. A signal at or
  after the last step (during the final checkpoint, or while the finished process shuts down) is not a
  reason to requeue: the run is complete and saved, so it returns EXIT_OK and says so; after a
  finished run a late SIGUSR1 is only logged (it would otherwise kill the exiting process with
  128+10, which the wrappers read as "died during start-up, requeue me").
- A step whose loss or gradient norm is non-finite is skipped (no optimizer/EMA update) and counted;
  after `run.max_nonfinite_in_row` such steps in a row the run rolls back to the last checkpoint.

The parts live elsewhere, each with its own tests, as in torchtitan's trainer: trainer/builder.py
assembles them (start-up, in order), trainer/checkpoint_manager.py saves, resumes and rolls back,
trainer/validation.py validates, samples and evaluates between steps, trainer/throughput.py counts
FLOPs and probes the loader, trainer/batches.py turns a loader batch into the step's inputs. This
module steps, logs and handles the stop signals.

`run.callbacks` (trainer/callbacks.py) hook extra code into the step and the checkpoint write; the
tests inject their faults (NaN batches, kills, held steps) that way, not through switches in here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path

import torch

from common.exit_codes import EXIT_REQUEUE
from trainer.batches import batch_digest, batch_keys, prepare_batch
from trainer.builder import TrainerParts, build_parts
from trainer.checkpoint_manager import MAX_ROLLBACKS_PER_CHECKPOINT
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.lr import lr_from_config
from trainer.metrics import BandAccumulator, StepLog, band_edges, peak_memory_gb, progress_line
from trainer.plan import start_background_plan
from trainer.step_control import Interval, NonFiniteGuard, SaveSchedule, StepResult
from trainer.storage import DiskFull, StorageFault

__all__ = ["EXIT_OK", "EXIT_REQUEUE", "MAX_ROLLBACKS_PER_CHECKPOINT", "Trainer", "batch_digest", "batch_keys",
           "run_training"]

log = logging.getLogger(__name__)
EXIT_OK = 0
# the per-step max-reduce: 1 = a stop signal, these = a write of the run failed (trainer.storage)
HALT_STORAGE, HALT_DISK_FULL = 2.0, 3.0


def _signal_after_the_run(signum, frame) -> None:
    log.warning("received %s after the run ended (finished, or stopped and saved); nothing more to save, "
                "the exit code stands", signal.Signals(signum).name)


class Trainer:
    """Steps a run built by trainer.builder.build_parts (or handed `parts`). The parts are attributes
    under their own names (strategy, ema, loader, metrics, checkpoints, checks, throughput, ...); the
    counters a checkpoint carries are `state` and read as `step`, `skipped_steps`, `rollbacks`."""

    def __init__(self, cfg: TrainConfig, dist_env: DistEnv | None = None, loader_factory=None, *,
                 parts: TrainerParts | None = None):
        """loader_factory(cfg.data, rank=, world_size=, train=[, grad_accum=]) defaults to
        data_pipeline.loader.build_loader."""
        p = parts or build_parts(cfg, dist_env, loader_factory)
        self.cfg, self.dist, self.metrics = p.cfg, p.dist, p.metrics
        self.rank, self.world = p.dist.rank, p.dist.world_size
        self.out_dir = Path(p.cfg.run.out_dir)
        self.strategy, self.compiled, self.diffusion, self.ema = p.strategy, p.compiled, p.diffusion, p.ema
        self.loader, self.batches, self.batch_hooks, self.conditioning = p.loader, p.batches, p.batch_hooks, p.conditioning
        self.state, self.callbacks, self.checkpoints, self.resumed_from = p.state, p.callbacks, p.checkpoints, p.resumed_from
        self.checks, self.throughput = p.checks, p.throughput
        # run.plan_at_start: this run's plan, computed in the background, printed beside perf/* (trainer.plan)
        self._plan = start_background_plan(p.cfg, p.dist, self.throughput.peak_tflops)
        self.bands = BandAccumulator(band_edges(p.cfg.diffusion.logsnr_min, p.cfg.diffusion.logsnr_max))
        self._stop_requested = False
        self._handlers_before_run: dict = {}  # restored by close() after a run that ended
        self._stop_signal = ""

    # ------------------------------------------------------------------ counters (saved in checkpoints)
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped_steps

    @property
    def rollbacks(self) -> int:
        return self.state.rollbacks

    @property
    def text_encoder_name(self) -> str:
        return self.state.text_encoder

    # ------------------------------------------------------------------ checkpoints, checks (collective)
    def save(self) -> Path:
        """Checkpoints this step (trainer.checkpoint_manager); returns its final path."""
        return self.checkpoints.save(during_write=lambda: self.callbacks.during_checkpoint_write(self))

    def poll_save(self) -> None:
        self.checkpoints.poll()

    def finish_save(self) -> None:
        self.checkpoints.finish()

    def validate(self) -> dict[str, float]:
        return self.checks.validator.run(self.step)

    def sample_to_tensorboard(self) -> list[Path]:
        return self.checks.samples.run(self.step)

    def evaluate(self) -> dict[str, float]:
        return self.checks.evaluation.run(self.step)

    def _rollback(self) -> None:
        self.checkpoints.rollback()
        self.batches.restart()  # the loader's position went back with the checkpoint

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        self._stop_requested = True
        self._stop_signal = signal.Signals(signum).name
        log.warning("received %s: will checkpoint after this step and exit %d", self._stop_signal, EXIT_REQUEUE)

    @contextlib.contextmanager
    def _signal_handlers(self):
        old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass
        ended = False
        try:
            yield
            ended = True
        finally:
            # A run that ended (finished, or stopped and saved) keeps harmless handlers until close():
            # a late scheduler's "save and requeue" (USR1) or a repeated SIGTERM (SLURM sends a
            # preempted task two) must not kill it with 128+N while it writes its last logs, which
            # train.sh and slurm.launch read as "requeue me" or as a failure. A run that raised gets
            # the old handlers back at once.
            for sig, handler in old.items():
                signal.signal(sig, _signal_after_the_run if ended else handler)
            self._handlers_before_run = old if ended else {}

    @property
    def stop_requested(self) -> bool:
        """A stop signal (SIGUSR1/SIGTERM) arrived; the run saves and exits after the current step."""
        return self._stop_requested

    # ------------------------------------------------------------------ one step
    def train_step(self, first_step: int | None = None) -> StepResult:
        cfg, s = self.cfg, self.strategy
        accum = cfg.optim.grad_accum
        lr = lr_from_config(self.step, cfg)
        s.set_lr(lr)
        data_wait = 0.0
        overhead = 0.0  # one-off start-up work inside the step (the batch hooks' FLOP count), not step time
        loss_sum = torch.zeros((), dtype=torch.float64)
        aux_sums: dict[str, float] = {}  # the model's auxiliary losses, mean over micro-batches
        n_videos = 0
        keys: list[str] = []
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = self.batches.next()
            data_wait += time.perf_counter() - t0
            keys += batch_keys(batch)
            batch, seconds = prepare_batch(self.batch_hooks, batch)
            overhead += seconds
            x = batch["video"].to(self.dist.device, non_blocking=True).float()
            x = self.callbacks.on_batch(self, x)
            n_videos += x.shape[0]
            cond = self.conditioning.for_training(batch, x)
            model = self.conditioning.denoiser(s.forward)  # keeps the model's auxiliary losses
            sync = s.no_sync() if micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with s.autocast():
                    per_sample, logsnr = self.diffusion.loss_terms(model, x, **cond)
                loss = per_sample.mean()
                s.backward((loss + model.weighted()) / accum)
            self.bands.add(per_sample, logsnr)
            loss_sum += loss.detach().double().cpu()
            for name, value in model.values().items():
                aux_sums[name] = aux_sums.get(name, 0.0) + value / accum
        self.callbacks.before_optimizer_step(self, self.step if first_step is None else first_step)
        grad_norm = s.clip_grad_norm(cfg.optim.grad_clip)
        loss_mean = s.all_reduce_mean(float(loss_sum) / accum)
        aux = {name: s.all_reduce_mean(value) for name, value in sorted(aux_sums.items())}
        digest = batch_digest([k for rank_keys in s.all_gather_object(keys) for k in rank_keys])
        ok = math.isfinite(loss_mean) and math.isfinite(grad_norm)
        if ok:
            s.optimizer_step()
            self.ema.update(s.local_params())
        else:
            s.skip_step()
            self.state.skipped_steps += 1
        s.zero_grad()
        return StepResult(loss=loss_mean, grad_norm=grad_norm, lr=lr, ok=ok, data_wait=data_wait, videos=n_videos,
                          batch_digest=digest, overhead=overhead, aux=aux)

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Steps until run.steps or a stop signal; returns EXIT_OK, or EXIT_REQUEUE after a signal's save."""
        run = self.cfg.run
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        logf = StepLog(self.out_dir / "train_log.jsonl", self.metrics) if self.rank == 0 else None
        guard = NonFiniteGuard(run.max_nonfinite_in_row)
        saves = SaveSchedule(run.ckpt_every, run.steps, self.step if self.resumed_from is not None else -1)
        interval = Interval()
        self.throughput.probe_loader()
        t_start, step_start = time.time(), self.step
        exit_code = EXIT_OK
        with self._signal_handlers():
            while self.step < run.steps:
                self.callbacks.on_step_start(self)
                out, seconds = self._timed_step(step_start)
                self.step += 1
                if logf is not None:
                    logf.write(out.log_record(self.step - 1))
                interval.add(out, seconds)
                if self._guard(out, guard):  # rolled back to the last checkpoint
                    saves.cancel()
                    continue
                if self.step % max(1, run.log_every) == 0 or self.step == run.steps:
                    self._log(interval, out, t_start, step_start)
                    interval = Interval()
                self.checks.after_step(self.step)
                self.poll_save()
                halt = self.strategy.all_reduce_max(self._halt_code())
                if halt >= HALT_STORAGE:
                    self._stop_for_storage(halt)
                stop = halt > 0
                if saves.due(self.step, in_streak=guard.in_streak, stop=stop):
                    self.save()
                    saves.saved(self.step)
                if stop:
                    self.finish_save()
                    exit_code = self._exit_code_after_stop()
                    break
            self.finish_save()
            self._report_late_signal(exit_code)
            if logf is not None:
                logf.close()
            self.metrics.flush()
            halt = self.strategy.all_reduce_max(self._halt_code() if self.metrics.fault is not None else 0.0)
            if halt >= HALT_STORAGE:  # the last lines of the log did not reach the disk
                self._stop_for_storage(halt)
        return exit_code

    def _halt_code(self) -> float:
        """This rank's reason to leave the loop now, max-reduced over the ranks after each step."""
        if self.checkpoints.failed():
            return HALT_DISK_FULL
        fault = self.metrics.fault
        if fault is not None:
            return HALT_DISK_FULL if isinstance(fault, DiskFull) else HALT_STORAGE
        return 1.0 if self._stop_requested else 0.0

    def _stop_for_storage(self, halt: float) -> None:
        """Collective, after some rank found a write of the run failed: a background checkpoint's failure
        is raised by `finish_save` on every rank; a failed log write by rank 0 with its message, and by
        the others with the same exit code."""
        self.finish_save()
        fault = self.metrics.fault
        if fault is None:
            cls = DiskFull if halt >= HALT_DISK_FULL else StorageFault
            fault = cls("rank 0 could not write the run's log (its message says where and why); this rank stops too")
        raise fault

    def _timed_step(self, step_start: int) -> tuple[StepResult, float]:
        """One step and its seconds (start-up overhead excluded)."""
        t0 = time.perf_counter()
        out = self.train_step(first_step=step_start)
        seconds = time.perf_counter() - t0 - out.overhead
        self.throughput.after_step(seconds)
        return out, seconds

    def _guard(self, out: StepResult, guard: NonFiniteGuard) -> bool:
        """Count the step with the guard and report it if skipped; True when it completed a non-finite
        streak and the run rolled back."""
        roll_back = guard.record(out, fp16=self.cfg.run.precision == "fp16")
        if out.ok:
            return False
        step_index = self.step - 1
        self.metrics.print(f"[nan-guard] step {step_index}: non-finite "
                           f"{'grad norm' if out.loss_finite else 'loss'} (loss={out.loss}, "
                           f"grad_norm={out.grad_norm}); step skipped ({self.skipped_steps} so far)")
        self.metrics.scalars({"train/skipped_steps": self.skipped_steps}, self.step)
        if roll_back:
            self._rollback()
        return roll_back

    def _exit_code_after_stop(self) -> int:
        """A stop signal's checkpoint is written: requeue unless the run was complete anyway."""
        if self.step >= self.cfg.run.steps:
            return EXIT_OK  # the run is complete and saved: nothing to requeue (reported below)
        self.metrics.print(f"[signal] checkpoint at step {self.step} written; exiting with {EXIT_REQUEUE} (requeue)")
        return EXIT_REQUEUE

    def _report_late_signal(self, exit_code: int) -> None:
        """A signal that arrived during the last step or its final checkpoint (after the ranks' last
        stop check) did not kill the process (we are still inside the handlers): say it was seen."""
        if exit_code == EXIT_OK and self._stop_requested:
            self.metrics.print(f"[signal] {self._stop_signal or 'stop signal'} arrived at the end of training; "
                               f"the final checkpoint at step {self.step} is written, exiting with "
                               f"{EXIT_OK} (finished, not requeued)")

    def _log(self, interval: Interval, out: StepResult, t_start: float, step_start: int) -> None:
        """Collective: the interval's scalars (loss, bands, data counters summed over ranks, perf) to
        TensorBoard and a progress line."""
        s = self.strategy
        frames_per_video = self.cfg.data.num_frames + self.cfg.data.num_image_frames
        step_time = interval.step_time
        wait = s.all_reduce_max(interval.wait / max(1, interval.steps))
        mem = s.all_reduce_max(peak_memory_gb(self.dist.device))
        videos_per_s = interval.videos * self.world / max(interval.seconds, 1e-9)
        bands = self.bands.reduced(s)
        self.bands.reset()
        loss = interval.mean_loss
        scalars = {"train/loss": loss, "train/lr": out.lr, "train/grad_norm": out.grad_norm,
                   **{f"train/{name}": v for name, v in interval.mean_aux.items()},  # train/motion_loss
                   "train/skipped_steps": self.skipped_steps, "train/rollbacks": self.rollbacks,
                   "perf/step_time_s": step_time, "perf/data_wait_s": wait, "perf/peak_mem_gb": mem,
                   "perf/videos_per_s": videos_per_s,
                   # every extra image frame is an independent training sample (joint training)
                   "perf/samples_per_s": videos_per_s * (1 + self.cfg.data.num_image_frames),
                   "perf/frames_per_s": videos_per_s * frames_per_video}
        # loader counters, summed over ranks: bad samples, samples under data.min_motion, shards
        # that could not be downloaded; every rank's loader has the same attributes (same class)
        for name in ("skipped_samples", "filtered_samples", "skipped_shards"):
            count = getattr(self.loader, name, None)
            if count is not None:
                scalars[f"data/{name}"] = s.all_reduce_mean(float(count)) * self.world
        scalars.update({f"train/loss_band/{k}": v for k, v in bands.items()})
        tflops, mfu = self.throughput.scalars(interval, step_time, scalars)
        self.metrics.scalars(scalars, self.step)
        for line in (self._plan.comparison(mem, step_time, mfu) if self._plan is not None else None) or []:
            self.metrics.print(line)
        elapsed = time.time() - t_start
        it_s = (self.step - step_start) / elapsed if elapsed > 0 else 0.0
        self.metrics.print(progress_line(self.step, self.cfg.run.steps, loss, out.lr, it_s,
                                         wait / max(step_time, 1e-9), self.skipped_steps, tflops=tflops, mfu=mfu))
        self.metrics.flush()

    def close(self) -> None:
        self.batches.restart()  # a multi-process loader's workers stop now, not at interpreter exit
        self.metrics.close()
        if self._plan is not None:
            self._plan.close()
        for sig, handler in self._handlers_before_run.items():
            signal.signal(sig, handler)
        self._handlers_before_run = {}


def run_training(cfg: TrainConfig) -> int:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
