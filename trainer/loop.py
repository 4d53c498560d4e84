"""The training loop: one loop for every strategy, with exact resume, EMA, NaN guard and monitoring.

What it guarantees (tests/test_trainer_*.py check each):
- Resume is automatic and exact: a run whose out_dir holds a checkpoint continues from it, and on CPU
  its per-step losses are bitwise those of an uninterrupted run (data position, RNG of every rank,
  optimizer/scaler state and EMA are restored; the LR is a pure function of the step).
- The data is elastic: each train_log.jsonl line carries `batch_digest` (the step's global batch), the
  same for any number of ranks or loader workers at the same global batch; single/ddp checkpoints
  resume on another process count, continuing at the next global sample.
- SIGUSR1/SIGTERM: the current step finishes, a checkpoint is written, and `train()` returns
  EXIT_REQUEUE (124) so a scheduler wrapper knows to requeue the job. A signal at or after the last
  step (during the final checkpoint, or while the finished process shuts down) is not a reason to
  requeue: the run is complete and saved, so it returns EXIT_OK and says so; after a finished run a
  late SIGUSR1 is only logged (it would otherwise kill the exiting process with 128+10, which the
  wrappers read as "died during start-up, requeue me").
- A step whose loss or gradient norm is non-finite is skipped (no optimizer/EMA update) and counted;
  after `run.max_nonfinite_in_row` such steps in a row the run rolls back to the last checkpoint.

`run.callbacks` (trainer/callbacks.py) hook extra code into the step and the checkpoint write; the
tests inject their faults (NaN batches, kills, held steps) that way, not through switches in here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
import yaml

from common.config import to_dict
from common.exit_codes import EXIT_REQUEUE
from model.motion import global_motion
from trainer import checkpoint as ckpt
from trainer.callbacks import load_callbacks
from trainer.config import TrainConfig
from trainer.distributed import DistEnv, init_distributed
from trainer.ema import EMA
from trainer.loaders import loader_factory_or_default
from trainer.lr import lr_from_config
from trainer.metrics import (
    BandAccumulator,
    Metrics,
    band_centers,
    band_edges,
    band_labels,
    band_training_weights,
    peak_memory_gb,
    progress_line,
)
from trainer.perf import BatchGeometry, StepFlops, peak_tflops
from trainer.plan import start_background_plan
from trainer.step_control import Interval, NonFiniteGuard, SaveSchedule, StepResult
from trainer.strategies.base import build_strategy

log = logging.getLogger(__name__)
EXIT_OK = 0
# seed salts: offsets of run.seed for streams that must not coincide with the data order's or each other's
RANK_SEED_STRIDE = 1_000_003  # each rank's torch/numpy/random seed: run.seed + stride * (rank + 1)
SALT_VAL_NOISE = 4242  # the fixed t and noise of the validation loss (same every evaluation)
MAX_ROLLBACKS_PER_CHECKPOINT = 3


def _signal_after_the_run(signum, frame) -> None:
    log.warning("received %s after the run ended (finished, or stopped and saved); nothing more to save, "
                "the exit code stands", signal.Signals(signum).name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng():
    """Validation and sampling must not shift the training RNG streams (exact resume)."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


def batch_keys(batch: dict) -> list[str]:
    """The sample keys a batch consumed: its clips and the clips its joint image frames came from
    (a loader without keys, such as the tests' in-memory one, contributes none)."""
    keys = list(batch.get("keys") or [])
    for sources in batch.get("image_keys") or []:
        keys += sources
    return keys


def batch_digest(keys: list[str]) -> str:
    """sha256 hex of the step's global batch: every rank's keys, sorted (duplicates kept). The same on
    every rank and for any number of ranks, since the global batch is (data_pipeline.loader)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def shard_encoder_name(shards_dir: str) -> str | None:
    """The text encoder named in a shard directory's index.json (None if there is none)."""
    index = Path(shards_dir) / "index.json" if shards_dir else None
    if index is None or not index.is_file():
        return None
    return (json.loads(index.read_text()).get("encoder") or {}).get("name")


def _check_settings(cfg: TrainConfig) -> None:
    """Combinations of settings the loop cannot honour, refused before anything is built."""
    if cfg.optim.grad_accum < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {cfg.optim.grad_accum}")
    if cfg.model.motion_conditioning and cfg.run.precision == "fp16":
        raise ValueError("model.motion_conditioning trains its caption->motion head by a gradient injected "
                         "in the backward pass, which fp16 loss scaling would shrink: use run.precision=bf16 "
                         "or fp32")


class Trainer:
    def __init__(self, cfg: TrainConfig, dist_env: DistEnv | None = None, loader_factory=None):
        """loader_factory(cfg.data, rank=, world_size=, train=[, grad_accum=]) defaults to
        data_pipeline.loader.build_loader."""
        self.cfg = cfg
        self._loader_factory = loader_factory
        self.dist = dist_env or init_distributed(cfg.parallel.backend)
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.out_dir = Path(cfg.run.out_dir)
        self.metrics = Metrics(self.out_dir, enabled=self.rank == 0)
        _check_settings(cfg)

        from model.diffusion import GaussianDiffusion

        self._gpu_settings()
        latest = ckpt.find_latest(self.out_dir)  # a rerun resumes from it (after the strategy is set up)
        self.strategy = self._wrapped_model(warm_start=latest is None)
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self.ema = EMA(self.strategy.local_params(), cfg.run.ema_decay)
        self.edges = band_edges(cfg.diffusion.logsnr_min, cfg.diffusion.logsnr_max)
        self.bands = BandAccumulator(self.edges)
        self.val_weights = band_training_weights(self.edges, self.diffusion.t_of_logsnr)
        self.loader = self._build_loader(train=True)
        self._iter = None
        self._check_text_dim()

        # counters saved in checkpoints
        self.step = 0
        self.skipped_steps = 0
        self.rollbacks = 0
        # the loader's index also covers remote shards (URLs, brace patterns) that Path() cannot read
        loader_index = getattr(self.loader, "index", None)
        self.text_encoder_name = (cfg.run.text_encoder or getattr(loader_index, "encoder_name", "")
                                  or shard_encoder_name(cfg.data.shards) or "")
        # per-rank streams for t, noise and caption dropout (differ across ranks, restored on resume)
        seed_everything(cfg.run.seed + RANK_SEED_STRIDE * (self.rank + 1))

        self.callbacks = load_callbacks(cfg.run.callbacks)
        self._stop_requested = False
        self._handlers_before_run: dict = {}  # restored by close() after a run that ended
        self._stop_signal = ""
        self._prompt_cache = None
        self._encoder = None
        self._val_batches = None
        self._rollbacks_from: dict[str, int] = {}
        self._pending_save: ckpt.PendingCheckpoint | None = None  # run.async_save: written in the background
        self.resumed_from = self._maybe_resume(latest)
        # every rank takes part in evaluate() (the EMA gather is collective); only rank 0 samples. A run
        # too short to reach its first evaluation needs no evaluator (nor its text encoder/detector).
        self._evaluates = 0 < cfg.run.eval_every <= cfg.run.steps
        self._evaluator = self._evaluator_for_run() if self._evaluates and self.rank == 0 else None
        # throughput accounting (trainer.perf): FLOPs are counted at the first batch's geometry
        self.step_flops: StepFlops | None = None
        self.peak_tflops, peak_source = peak_tflops(self.dist.device, cfg.run.precision, cfg.run.peak_tflops)
        self.metrics.print(f"[perf] peak {self.peak_tflops:g} TFLOP/s per device from {peak_source}"
                           if self.peak_tflops else f"[perf] perf/mfu not logged: {peak_source}")
        self._loader_rate: float | None = None  # clips/s of the start-up loader probe (nan: probe failed)
        self._plan = start_background_plan(cfg, self.dist, self.peak_tflops)

    def _wrapped_model(self, warm_start: bool):
        """The model, built with the same seed on every rank (identical initial weights), warm-started
        unless a checkpoint will be resumed, compiled per block when asked (before the strategy wraps
        the blocks: trainer/compile.py), then handed to the strategy. Returns the strategy."""
        from model.unet import SpaceTimeUNet

        cfg = self.cfg
        seed_everything(cfg.run.seed)
        model = SpaceTimeUNet(cfg.model)
        if warm_start:
            self._warm_start(model)
        self.compiled = None
        if cfg.run.compile:
            from trainer.compile import compile_blocks

            self.compiled = compile_blocks(model, cfg.run.compile_backend, cfg.run.compile_mode or None)
        strategy = build_strategy(cfg, self.dist)
        strategy.setup(model)
        return strategy

    def _check_text_dim(self) -> None:
        text_dim = getattr(self.loader, "text_dim", None)
        if text_dim is not None and int(text_dim) != self.cfg.model.text_dim:
            raise ValueError(f"the shards in {self.cfg.data.shards} hold {text_dim}-d text embeddings but "
                             f"model.text_dim is {self.cfg.model.text_dim}; set model.text_dim={text_dim}")

    def _gpu_settings(self) -> None:
        """Free speed on CUDA, nothing changed on CPU: fp32 runs may use TF32 tensor cores for matmuls
        and convolutions (10-bit mantissa products, fp32 accumulation: the usual trade for training;
        set run.precision to bf16 for more). Fused AdamW and pinned loader memory are set where the
        optimizer and the loader are built (trainer.strategies.base, data_pipeline.loader)."""
        if self.dist.device.type == "cuda" and self.cfg.run.precision == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # ------------------------------------------------------------------ data
    def _build_loader(self, train: bool, **kwargs):
        """The training loader also gets optim.grad_accum: with data.batch_size and the world size it
        makes the global batch, the unit in which the global sample sequence is cut into steps."""
        factory = loader_factory_or_default(self._loader_factory)
        if train:
            kwargs.setdefault("grad_accum", self.cfg.optim.grad_accum)
        return factory(self.cfg.data, rank=self.rank, world_size=self.world, train=train, **kwargs)

    def _next_batch(self) -> dict:
        # The data loader must not touch the training RNG streams: torch's DataLoader draws a base
        # seed from the global RNG whenever an iterator starts (lazily, at the first next()), and a
        # resumed run starts its iterator at a different step than an uninterrupted one. Fencing the
        # loader off keeps t/noise/caption-dropout draws identical (exact resume).
        with preserved_rng():
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:  # a finite loader: start the next pass
                self._iter = iter(self.loader)
                return next(self._iter)

    def _static_text(self, batch: dict) -> dict:
        """Captions padded (masked) to data.max_text_len, for compiled runs: the loader pads each batch
        to its longest caption, and every new length would recompile the cross-attention blocks.
        Masked tokens change nothing (the pooling and the cross-attention ignore them)."""
        emb, mask = batch["text_emb"], batch["text_mask"]
        pad = self.cfg.data.max_text_len - emb.shape[1]
        if pad <= 0:
            return batch
        return {**batch, "text_emb": torch.nn.functional.pad(emb, (0, 0, 0, pad)),
                "text_mask": torch.nn.functional.pad(mask, (0, pad), value=False)}

    def _cond(self, batch: dict, drop_captions: bool) -> dict:
        dev = self.dist.device
        emb = batch["text_emb"].to(dev, non_blocking=True)
        mask = batch["text_mask"].to(dev, non_blocking=True).bool()
        if drop_captions and self.cfg.run.caption_dropout > 0:
            drop = torch.rand(mask.shape[0]) < self.cfg.run.caption_dropout
            mask = mask & ~drop.to(dev)[:, None]  # an all-False row = the model's null embedding
        return {"text_emb": emb, "text_mask": mask, "num_video_frames": int(batch["num_video_frames"])}

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
                "text_encoder": self.text_encoder_name, "config": to_dict(self.cfg)}

    def save(self) -> Path:
        """Collective. Checkpoints this step; with run.async_save the files are still being written on
        return (the checkpoint becomes the latest in `poll_save`/`finish_save`). Returns its final path."""
        self.finish_save()  # one checkpoint in flight at a time
        pending = ckpt.start_checkpoint(
            self.strategy, self.out_dir, self.step, ema=self.ema, loader_state=self.loader.state_dict(),
            state=self._state(), keep_last=self.cfg.run.keep_last,
            during_write=lambda: self.callbacks.during_checkpoint_write(self),
            files={"config.yaml": yaml.safe_dump(to_dict(self.cfg), sort_keys=False)},
            background=self.cfg.run.async_save)
        if not self.cfg.run.async_save:
            self.metrics.print(f"[ckpt] saved {pending.wait(self.strategy)}")
            return pending.final
        self._pending_save = pending
        self.metrics.print(f"[ckpt] writing {pending.final.name} in the background")
        return pending.final

    def poll_save(self) -> None:
        """Between steps: rank 0 commits a background checkpoint once every rank's files are written."""
        pending = self._pending_save
        if pending is not None and not pending.committed and pending.poll():
            self.metrics.print(f"[ckpt] saved {pending.final} (written in the background in "
                               f"{time.perf_counter() - pending.started:.1f} s)")

    def finish_save(self) -> None:
        """Collective: wait for a background checkpoint and commit it (before another save, a rollback
        and the end of the run)."""
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            committed = pending.committed
            pending.wait(self.strategy)
            if not committed:
                self.metrics.print(f"[ckpt] saved {pending.final} (waited for its background write)")

    def _load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(self.strategy, path, ema=self.ema)
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))
        self.text_encoder_name = self.text_encoder_name or state.get("text_encoder", "")
        if state.get("loader") is not None:
            # every rank's saved state: the streams this rank reads now may have been another rank's
            self.loader.load_state_dict(state.get("loaders") or state["loader"])
        self._iter = None

    def _warm_start(self, model) -> None:
        """run.init_from, for a new run only (a rerun resumes from its own checkpoint), applied to the
        bare model before the strategy wraps (and maybe shards) it, so every strategy starts from these
        weights and the EMA, built from the wrapped parameters, too."""
        source = self.cfg.run.init_from
        if not source:
            return
        from trainer.export import load_initial_weights

        try:
            meta = load_initial_weights(model, source, self.cfg.model)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"run.init_from={source}: {e}") from None
        self.metrics.print(f"[init] model and EMA weights from {source} (step {meta.get('step') or '?'} of "
                           f"its run); optimizer, step and data order start afresh")
        self.metrics.text("train/events", f"initialised from {source}", 0)

    def _maybe_resume(self, latest: Path | None) -> Path | None:
        if latest is None:
            if self.rank == 0:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            return None
        self._load(latest)
        self.metrics.print(f"[resume] {latest} at step {self.step}")
        return latest

    def _rollback(self) -> None:
        self.finish_save()
        latest = ckpt.find_latest(self.out_dir)
        if latest is None:
            raise RuntimeError(f"{self.cfg.run.max_nonfinite_in_row} non-finite steps in a row at step {self.step} "
                               f"and no checkpoint in {self.out_dir} to roll back to")
        n = self._rollbacks_from.get(latest.name, 0) + 1
        if n > MAX_ROLLBACKS_PER_CHECKPOINT:
            raise RuntimeError(f"rolled back to {latest} {n - 1} times and still diverging; lower the LR or "
                               f"inspect the data after step {self.step}")
        self._rollbacks_from[latest.name] = n
        bad_step = self.step - 1
        rollbacks, skipped = self.rollbacks + 1, self.skipped_steps
        self._load(latest)
        self.rollbacks, self.skipped_steps = rollbacks, skipped  # events stay counted across rollbacks
        self.metrics.print(f"[nan-guard] {self.cfg.run.max_nonfinite_in_row} non-finite steps in a row up to "
                           f"step {bad_step}: rolled back to {latest.name} (rollback #{self.rollbacks})")
        self.metrics.scalars({"train/rollbacks": self.rollbacks}, bad_step)
        self.metrics.text("train/events", f"rollback at step {bad_step} to {latest.name}", bad_step)

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
        overhead = 0.0  # one-off start-up work inside the step (the FLOP count), kept out of step time
        loss_sum = torch.zeros((), dtype=torch.float64)
        n_videos = 0
        keys: list[str] = []
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = self._next_batch()
            data_wait += time.perf_counter() - t0
            keys += batch_keys(batch)
            if self.compiled is not None:
                batch = self._static_text(batch)
            if self.step_flops is None:
                t0 = time.perf_counter()
                self._count_flops(batch)
                overhead += time.perf_counter() - t0
            x = batch["video"].to(self.dist.device, non_blocking=True).float()
            x = self.callbacks.on_batch(self, x)
            n_videos += x.shape[0]
            cond = self._cond(batch, drop_captions=True)
            if self.cfg.model.motion_conditioning:
                cond["motion"] = global_motion(x[:, :, :cond["num_video_frames"]])
            sync = s.no_sync() if micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with s.autocast():
                    per_sample, logsnr = self.diffusion.loss_terms(s.forward, x, **cond)
                loss = per_sample.mean()
                s.backward(loss / accum)
            self.bands.add(per_sample, logsnr)
            loss_sum += loss.detach().double().cpu()
        self.callbacks.before_optimizer_step(self, self.step if first_step is None else first_step)
        grad_norm = s.clip_grad_norm(cfg.optim.grad_clip)
        loss_mean = s.all_reduce_mean(float(loss_sum) / accum)
        digest = batch_digest([k for rank_keys in s.all_gather_object(keys) for k in rank_keys])
        ok = math.isfinite(loss_mean) and math.isfinite(grad_norm)
        if ok:
            s.optimizer_step()
            self.ema.update(s.local_params())
        else:
            s.skip_step()
            self.skipped_steps += 1
        s.zero_grad()
        return StepResult(loss=loss_mean, grad_norm=grad_norm, lr=lr, ok=ok, data_wait=data_wait, videos=n_videos,
                          batch_digest=digest, overhead=overhead)

    def _count_flops(self, batch: dict) -> None:
        """Model and hardware FLOPs of one optimizer step at this batch's geometry (meta device, no
        compute; trainer.perf). Later batches may have other caption lengths: the text tokens are a
        small share of the work, so the first batch stands for the run."""
        geometry = BatchGeometry.of_batch(batch)
        with preserved_rng():  # building a model (on meta) must not shift the training RNG (exact resume)
            self.step_flops = f = StepFlops.count(self.cfg.model, geometry, self.cfg.optim.grad_accum)
        recompute = (f"; hardware {f.hardware / 1e9:.4g} GFLOP with checkpoint policy {f.policy} "
                     f"(+{100 * (f.hardware / f.model - 1):.1f}% recompute)" if f.policy != "none" else "")
        self.metrics.print(f"[perf] model FLOPs per optimizer step and rank: {f.model / 1e9:.4g} GFLOP "
                           f"(forward + backward, {self.cfg.optim.grad_accum} x micro-batch {geometry.describe()})"
                           f"{recompute}")
        self.metrics.text("perf/flops", json.dumps({"model_flops": f.model, "hardware_flops": f.hardware,
                                                    "policy": f.policy, "grad_accum": self.cfg.optim.grad_accum,
                                                    "geometry": dataclasses.asdict(geometry)}), self.step)

    def _probe_loader(self) -> None:
        """Time `run.loader_probe_batches` batches from a second, throw-away loader (the run's own
        loader, its position and the RNG streams are untouched) → clips/s this rank's loader can
        deliver; compared with what training consumes at the first log (`_log`)."""
        n = self.cfg.run.loader_probe_batches
        if n < 0:
            n = 8 if self.dist.device.type == "cuda" else 0
        if n < 2:
            return
        with preserved_rng():
            loader = self._build_loader(train=True)
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

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Steps until run.steps or a stop signal; returns EXIT_OK, or EXIT_REQUEUE after a signal's save."""
        run = self.cfg.run
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.out_dir / "train_log.jsonl", "a", buffering=1) if self.rank == 0 else None
        guard = NonFiniteGuard(run.max_nonfinite_in_row)
        saves = SaveSchedule(run.ckpt_every, run.steps, self.step if self.resumed_from is not None else -1)
        interval = Interval()
        self._probe_loader()
        t_start, step_start = time.time(), self.step
        exit_code = EXIT_OK
        with self._signal_handlers():
            while self.step < run.steps:
                self.callbacks.on_step_start(self)
                out, seconds = self._timed_step(step_start)
                self.step += 1
                if logf is not None:
                    logf.write(json.dumps(out.log_record(self.step - 1)) + "\n")
                interval.add(out, seconds)
                if self._guard(out, guard):  # rolled back to the last checkpoint
                    saves.cancel()
                    continue
                if self.step % max(1, run.log_every) == 0 or self.step == run.steps:
                    self._log(interval, out, t_start, step_start)
                    interval = Interval()
                self._periodic_checks()
                self.poll_save()
                stop = self.strategy.all_reduce_max(1.0 if self._stop_requested else 0.0) > 0
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
        return exit_code

    def _timed_step(self, step_start: int) -> tuple[StepResult, float]:
        """One step and its seconds (start-up overhead excluded); the first compiled step reports
        what compilation took."""
        t0 = time.perf_counter()
        out = self.train_step(first_step=step_start)
        seconds = time.perf_counter() - t0 - out.overhead
        if self.compiled is not None and self.compiled.graphs_after_warmup is None:
            self.compiled.mark_warm(seconds)
            self.metrics.print(f"[compile] first step {seconds:.1f} s with compilation: "
                               f"{self.compiled.graphs()} graphs for {self.compiled.blocks} blocks "
                               f"(backend {self.compiled.backend})")
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

    def _periodic_checks(self) -> None:
        """Validation loss, TensorBoard samples and evaluation, each on its own schedule."""
        run = self.cfg.run
        if run.val_every > 0 and self.step % run.val_every == 0 and self.cfg.data.val_shards:
            self.validate()
        if run.sample_every > 0 and self.step % run.sample_every == 0 and run.sample_prompts:
            self.sample_to_tensorboard()
        if self._evaluates and self.step % run.eval_every == 0:
            self.evaluate()

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
            self._check_loader(interval, step_time, wait, scalars)
        if self.compiled is not None:
            scalars["perf/recompiles"] = new = self.compiled.new_graphs()
            if new:
                self.metrics.print(f"[compile] WARNING: {new} graphs compiled after the first step (recompilation: "
                                   f"a shape changed, e.g. the caption length); see TORCH_LOGS=recompiles")
        self.metrics.scalars(scalars, self.step)
        for line in (self._plan.comparison(mem, step_time, mfu) if self._plan is not None else None) or []:
            self.metrics.print(line)
        elapsed = time.time() - t_start
        it_s = (self.step - step_start) / elapsed if elapsed > 0 else 0.0
        self.metrics.print(progress_line(self.step, self.cfg.run.steps, loss, out.lr, it_s,
                                         wait / max(step_time, 1e-9), self.skipped_steps, tflops=tflops, mfu=mfu))
        self.metrics.flush()

    def _check_loader(self, interval: Interval, step_time: float, wait: float, scalars: dict) -> None:
        """Once, at the first log: the loader's probed clips/s over the clips/s the step consumes when
        it never waits (compute time only). Below 1 the accelerator will wait for data (starved)."""
        s = self.strategy
        compute = max(step_time - interval.wait / max(1, interval.steps), 1e-9)
        consumed = interval.videos / max(1, interval.steps) / compute  # clips/s on this rank
        rate = self._loader_rate
        self._loader_rate = None
        local = rate / consumed if math.isfinite(rate) else math.inf  # a rank that measured nothing: no vote
        ratio = -s.all_reduce_max(-local)  # the worst rank
        if not math.isfinite(ratio):
            self.metrics.print("[perf] loader probe measured nothing (fewer than 2 batches); no loader check")
            return
        scalars["perf/loader_to_consumption"] = ratio
        verdict = ("ok" if ratio >= 1.2 else "tight: little headroom" if ratio >= 1 else
                   "STARVED: the accelerator will wait for data; raise data.num_workers or use npy shards")
        self.metrics.print(f"[perf] loader delivers {rate:.1f} clips/s per rank, training consumes {consumed:.1f} "
                           f"(worst rank ratio {ratio:.2f}): {verdict}; perf/data_wait_s tracks it from here")

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss on the held-out shards at fixed log-SNR band centres with fixed noise: comparable
        across steps and runs. Every rank evaluates the same batches (sharded models need all ranks
        in each forward), so no rank can run out of batches before the others."""
        cfg, s = self.cfg, self.strategy
        if self._val_batches is None:
            val_cfg = type(cfg.data)(**{**cfg.data.__dict__, "shards": cfg.data.val_shards})
            loader = loader_factory_or_default(self._loader_factory)(val_cfg, rank=0, world_size=1, train=False)
            batches = []
            for batch in loader:
                batches.append(batch)
                if len(batches) >= max(1, cfg.run.val_batches):
                    break
            self._val_batches = batches
            if not batches:
                self.metrics.print(f"[val] no batches in {cfg.data.val_shards}; validation disabled")
        if not self._val_batches:
            return {}
        centers = band_centers(self.edges)
        labels = band_labels(self.edges)
        totals = [0.0] * len(centers)
        s.model.eval()
        try:
            with preserved_rng():
                gen = torch.Generator().manual_seed(cfg.run.seed + SALT_VAL_NOISE)
                for batch in self._val_batches:
                    x = batch["video"].float()
                    cond = self._cond(batch, drop_captions=False)
                    for i, c in enumerate(centers):
                        noise = torch.randn(x.shape, generator=gen).to(self.dist.device)
                        t = self.diffusion.t_of_logsnr(torch.full((x.shape[0],), c)).to(self.dist.device)
                        with s.autocast():
                            per_sample, _ = self.diffusion.loss_terms(
                                s.forward, x.to(self.dist.device), t=t, noise=noise, **cond)
                        totals[i] += float(per_sample.mean())
        finally:
            s.model.train()
        n = len(self._val_batches)
        result = {f"val/loss_band/{label}": tot / n for label, tot in zip(labels, totals)}
        result["val/loss"] = sum(w * tot / n for w, tot in zip(self.val_weights, totals))
        result["val/loss_band_mean"] = sum(totals) / (n * len(totals))
        self.metrics.scalars(result, self.step)
        self.metrics.print(f"[val] step {self.step}: loss {result['val/loss']:.4f}")
        return result

    # ------------------------------------------------------------------ samples
    def _prompts(self):
        if self._prompt_cache is None:
            from trainer.generate import encode_prompts, load_text_encoder

            if not self.text_encoder_name:
                raise RuntimeError("run.sample_prompts needs a text encoder: set run.text_encoder or use shards "
                                   "whose index.json names one")
            enc = load_text_encoder(self.text_encoder_name, self.cfg.data.max_text_len)
            self._prompt_cache = encode_prompts(enc, list(self.cfg.run.sample_prompts))
        return self._prompt_cache

    def _ema_model_on_rank0(self):
        """The EMA weights as a plain SpaceTimeUNet on rank 0 (None elsewhere); a collective call."""
        from model.unet import SpaceTimeUNet

        full = self.strategy.gather_full_state(self.ema.shadow)  # collective
        if self.rank != 0:
            return None
        model = SpaceTimeUNet(self.cfg.model)
        model.load_state_dict(full)
        return model.to(self.dist.device)

    def sample_to_tensorboard(self) -> list[Path]:
        """EMA-weight samples for run.sample_prompts → TensorBoard (samples/<i>) and out_dir/samples/."""
        from trainer.generate import generate
        from trainer.video_io import to_uint8_frames, write_gif, write_mp4

        model = self._ema_model_on_rank0()
        written: list[Path] = []
        if self.rank == 0:
            cfg = self.cfg
            with preserved_rng():
                emb, mask = self._prompts()
                videos = generate(model, self.diffusion, emb, mask, frames=cfg.data.num_frames,
                                  height=cfg.data.image_size, width=cfg.data.image_size,
                                  channels=cfg.model.in_channels, sampling=cfg.sampling,
                                  steps=cfg.run.sample_steps, seed=cfg.run.seed, device=self.dist.device)
                del model
            out = self.out_dir / "samples" / ckpt.step_dir_name(self.step)
            for i, (video, prompt) in enumerate(zip(videos, cfg.run.sample_prompts)):
                frames = to_uint8_frames(video)
                self.metrics.video(f"samples/{i}", frames, self.step, upscale=max(1, 64 // frames.shape[1]))
                slug = "".join(ch if ch.isalnum() else "_" for ch in prompt)[:40]
                written += [write_mp4(out / f"{i}_{slug}.mp4", frames), write_gif(out / f"{i}_{slug}.gif", frames)]
            self.metrics.text("samples/prompts", "\n".join(f"{i}: {p}" for i, p in
                                                          enumerate(cfg.run.sample_prompts)), self.step)
            self.metrics.print(f"[samples] step {self.step}: {len(written) // 2} videos in {out}")
            self.metrics.flush()
        self.strategy.barrier()
        return written

    # ------------------------------------------------------------------ evaluation
    def _evaluator_for_run(self):
        """The run's Evaluator (rank 0), checked at start-up so a missing detector or val shards fail
        before hours of training rather than at the first evaluation."""
        from trainer.evaluate import Evaluator

        evaluator = Evaluator(self.cfg, self.text_encoder_name, self.dist.device, loader_factory=self._loader_factory)
        evaluator.check()
        return evaluator

    def evaluate(self) -> dict[str, float]:
        """run.eval_every: the `eval:` section on the EMA weights → TensorBoard eval/*, an [eval] line
        and out_dir/eval_log.jsonl. Rank 0 samples while the others wait at a barrier."""
        model = self._ema_model_on_rank0()
        scalars: dict[str, float] = {}
        if self.rank == 0:
            with preserved_rng():
                result = self._evaluator.run(model)
            del model
            scalars = {f"eval/{k}": v for k, v in result.metrics.items()}
            self.metrics.scalars(scalars, self.step)
            self.metrics.text("eval/settings", json.dumps(result.info, sort_keys=True), self.step)
            for line in result.lines:
                self.metrics.print(line)
            self.metrics.print(f"[eval] step {self.step}: {result.summary()}")
            with open(self.out_dir / "eval_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, **result.metrics, "info": result.info}) + "\n")
            self.metrics.flush()
        self.strategy.barrier()
        return scalars

    def close(self) -> None:
        self._iter = None  # a multi-process loader's workers stop now, not at interpreter exit
        self.metrics.close()
        for sig, handler in self._handlers_before_run.items():
            signal.signal(sig, handler)
        self._handlers_before_run = {}


def run_training(cfg: TrainConfig) -> int:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
