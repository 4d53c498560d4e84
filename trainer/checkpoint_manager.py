"""The run's checkpoints as one component, as torchtitan's trainer hands them to its checkpointer:
save (synchronously or in the background), commit a background save between steps, resume a rerun,
roll back after a non-finite streak, and warm-start a new run (`run.init_from`).

The files themselves (layout, atomic rename, loading across strategies and world sizes) are
trainer/checkpoint.py; this module decides when and with what: the loop's counters (`TrainState`),
the EMA and every rank's loader position travel with the weights.

Storage faults (docs/trainer.md "Storage faults"): before a save the free space is compared with the
last checkpoint's size (run.on_low_disk); a save that fails for space stops the run with
trainer.storage.DiskFull on every rank; a rerun picks the newest checkpoint that verifies
(`choose_resume`, one broadcast) and, if loading it still fails on any rank, the builder rebuilds the
trainer from scratch without it (`ResumeLoadFailed`), so no run goes on from a partly loaded state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import yaml

from common.config import to_dict
from trainer import checkpoint as ckpt
from trainer import storage
from trainer.step_control import TrainState

log = logging.getLogger(__name__)

MAX_ROLLBACKS_PER_CHECKPOINT = 3


def warm_start(model, source: str, model_cfg, metrics) -> None:
    """run.init_from, for a new run only (a rerun resumes from its own checkpoint), applied to the bare
    model before the strategy wraps (and maybe shards) it, so every strategy starts from these weights
    and the EMA, built from the wrapped parameters, too."""
    if not source:
        return
    from trainer.export import load_initial_weights

    try:
        meta = load_initial_weights(model, source, model_cfg)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"run.init_from={source}: {e}") from None
    metrics.print(f"[init] model and EMA weights from {source} (step {meta.get('step') or '?'} of "
                  f"its run); optimizer, step and data order start afresh")
    metrics.text("train/events", f"initialised from {source}", 0)


class ResumeLoadFailed(storage.CheckpointDamaged):
    """A checkpoint that verified but did not load on some rank; the builder starts over without it."""

    def __init__(self, ckpt_dir: Path, why: str):
        super().__init__(f"{ckpt_dir} could not be loaded: {why}")
        self.ckpt_dir, self.why = ckpt_dir, why


def _from_rank0(value, world_size: int):
    """`value` of rank 0 on every rank: one broadcast (usable before any strategy exists)."""
    if world_size == 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _decide_resume(cfg, tried: list[tuple[str, str]]) -> dict:
    """Rank 0: the newest checkpoint that verifies, skipping those in `tried` (name, why) and adding
    the ones that fail; `error` when none may be used."""
    run, tried = cfg.run, list(tried)
    root = ckpt.checkpoint_root(run.out_dir)
    candidates = [c for c in ckpt.newest_first(run.out_dir) if c.name not in {n for n, _ in tried}]
    chosen = None
    for cand in candidates:
        problems = ckpt.verify_checkpoint(cand, checksums=run.verify_checkpoints)
        if not problems:
            chosen = cand
            break
        tried.append((cand.name, "; ".join(problems)))
        log.error("[resume] checkpoint %s failed verification: %s", cand, "; ".join(problems))
        if run.resume_strict:
            break
    decision = {"path": str(chosen) if chosen else None, "tried": tried, "error": None, "warning": None}
    if not tried:
        return decision
    damaged = f"checkpoint {root / tried[0][0]} is damaged ({tried[0][1]})"
    if run.resume_strict:
        decision["error"] = (f"{damaged}; run.resume_strict=true refuses to resume from an older one (set it to "
                             f"false to resume from the newest checkpoint that verifies, or repair the file)")
    elif chosen is None:
        decision["error"] = (f"no checkpoint in {root} can be resumed; tried: {ckpt.damage_report(tried)}. Restore "
                             f"one (or move them away to start over)")
    else:
        decision["warning"] = (f"[resume] WARNING: {damaged}; resuming from {chosen.name} instead, the newest "
                               f"checkpoint that verifies (the steps after it are trained again)")
    return decision


def choose_resume(cfg, world_size: int, rank: int, metrics, tried: list[tuple[str, str]] = ()) -> Path | None:
    """Collective (one broadcast): the checkpoint a rerun resumes from, the same on every rank; None for
    a new run. Raises storage.CheckpointDamaged on every rank when run.resume_strict refuses a damaged
    latest checkpoint or none verifies; warns naming both when it falls back."""
    decision = _decide_resume(cfg, list(tried)) if rank == 0 else None
    decision = _from_rank0(decision, world_size)
    if decision["error"]:
        raise storage.CheckpointDamaged(decision["error"])
    if decision["warning"]:
        metrics.print(decision["warning"])
        metrics.text("train/events", decision["warning"], 0)
    return Path(decision["path"]) if decision["path"] else None


class CheckpointManager:
    """Saves and loads `strategy` (model, optimizer, scaler), `ema`, `loader`'s position and `state` in
    cfg.run.out_dir/checkpoints. Every method is collective unless it says otherwise."""

    def __init__(self, cfg, strategy, ema, loader, state: TrainState, metrics, rank: int):
        self.cfg, self.strategy, self.ema, self.loader = cfg, strategy, ema, loader
        self.state, self.metrics, self.rank = state, metrics, rank
        self.out_dir = Path(cfg.run.out_dir)
        self._pending: ckpt.PendingCheckpoint | None = None  # run.async_save: written in the background
        self._rollbacks_from: dict[str, int] = {}

    def latest(self) -> Path | None:
        """The last complete checkpoint of this run (not collective)."""
        return ckpt.find_latest(self.out_dir)

    # ------------------------------------------------------------------ save
    def save(self, during_write: Callable[[], None] | None = None) -> Path:
        """Checkpoints this step; with run.async_save the files are still being written on return (the
        checkpoint becomes the latest in `poll`/`finish`). `during_write` runs inside the write, before
        the rename (run.callbacks). Returns the checkpoint's final path."""
        run = self.cfg.run
        self.finish()  # one checkpoint in flight at a time
        self._check_space()
        pending = ckpt.start_checkpoint(
            self.strategy, self.out_dir, self.state.step, ema=self.ema, loader_state=self.loader.state_dict(),
            state={**self.state.checkpoint_fields(), "config": to_dict(self.cfg)}, keep_last=run.keep_last,
            during_write=during_write or (lambda: None),
            files={"config.yaml": yaml.safe_dump(to_dict(self.cfg), sort_keys=False)},
            background=run.async_save)
        if not run.async_save:
            self.metrics.print(f"[ckpt] saved {pending.wait(self.strategy)}")
            return pending.final
        self._pending = pending
        self.metrics.print(f"[ckpt] writing {pending.final.name} in the background")
        return pending.final

    def _check_space(self) -> None:
        """Collective: stop (or warn, run.on_low_disk) before a checkpoint that would not fit beside the
        last one is half written. Each rank looks at its own view of out_dir (node-local disks differ)."""
        short = ckpt.space_shortfall(self.out_dir)
        name = ckpt.step_dir_name(self.state.step)
        if self.strategy.all_reduce_max(1.0 if short else 0.0) == 0:
            return
        if short is None:
            message = f"checkpoint {name} not written: another rank found too little free space (see its message)"
        else:
            needed, free, prev = short
            message = ckpt.disk_full_message(self.out_dir, name, f"run.on_low_disk={self.cfg.run.on_low_disk}: "
                                             f"{storage.human(free)} free < {storage.human(needed)} needed")
        if self.cfg.run.on_low_disk == "stop":
            raise storage.DiskFull(message)
        if short is not None:
            log.warning("%s; trying anyway (run.on_low_disk=warn)", message)

    def failed(self) -> bool:
        """Not collective: whether a background save has failed as far as this rank can tell; the loop
        max-reduces it and then calls `finish`, which raises the failure on every rank."""
        return self._pending is not None and self._pending.failed()

    def poll(self) -> None:
        """Between steps: rank 0 commits a background checkpoint once every rank's files are written."""
        pending = self._pending
        if pending is not None and not pending.committed and pending.poll():
            self.metrics.print(f"[ckpt] saved {pending.final} (written in the background in "
                               f"{time.perf_counter() - pending.started:.1f} s)")

    def finish(self) -> None:
        """Wait for a background checkpoint and commit it (before another save, a rollback and the end
        of the run)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            committed = pending.committed
            pending.wait(self.strategy)
            if not committed:
                self.metrics.print(f"[ckpt] saved {pending.final} (waited for its background write)")

    # ------------------------------------------------------------------ load
    def _load(self, path: Path) -> None:
        saved = ckpt.load_checkpoint(self.strategy, path, ema=self.ema)
        st = self.state
        st.step = int(saved["step"])
        st.skipped_steps = int(saved.get("skipped_steps", 0))
        st.rollbacks = max(st.rollbacks, int(saved.get("rollbacks", 0)))
        st.text_encoder = st.text_encoder or saved.get("text_encoder", "")
        if saved.get("loader") is not None:
            # every rank's saved state: the streams this rank reads now may have been another rank's
            self.loader.load_state_dict(saved.get("loaders") or saved["loader"])

    def resume(self, latest: Path | None) -> Path | None:
        """A rerun continues from `latest` (model, optimizer, EMA, RNG, loader position, counters); a
        new run writes its config.yaml. Returns what was resumed, or None. The caller restarts its
        batch iterator: the loader's position changed. Raises ResumeLoadFailed on every rank when `latest`
        did not load on some rank (the model and optimizer may be partly overwritten: rebuild them)."""
        if self.rank == 0:  # a save that never finished (a kill, a full disk): its space is needed now
            removed = ckpt.remove_stale_temp_dirs(self.out_dir)
            if removed:
                self.metrics.print(f"[resume] removed {len(removed)} unfinished checkpoint write(s): {', '.join(removed)}")
        if latest is None:
            if self.rank == 0:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            return None
        try:
            self._load(latest)
            error = None
        except ckpt.ERRORS as e:  # any rank; decided together below
            error = storage.describe(e)
            log.error("[resume] loading %s failed: %s", latest, error)
        errors = self.strategy.all_gather_object(error)
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        if failed:
            raise ResumeLoadFailed(latest, "; ".join(failed))
        self.metrics.print(f"[resume] {latest} at step {self.state.step}")
        return latest

    def rollback(self) -> Path:
        """After run.max_nonfinite_in_row non-finite steps: reload the last checkpoint, keeping the
        skipped-step and rollback counts; gives up (RuntimeError) after MAX_ROLLBACKS_PER_CHECKPOINT
        rollbacks to the same checkpoint. The caller restarts its batch iterator."""
        self.finish()
        st = self.state
        latest = self.latest()
        if latest is None:
            raise RuntimeError(f"{self.cfg.run.max_nonfinite_in_row} non-finite steps in a row at step {st.step} "
                               f"and no checkpoint in {self.out_dir} to roll back to")
        n = self._rollbacks_from.get(latest.name, 0) + 1
        if n > MAX_ROLLBACKS_PER_CHECKPOINT:
            raise RuntimeError(f"rolled back to {latest} {n - 1} times and still diverging; lower the LR or "
                               f"inspect the data after step {st.step}")
        self._rollbacks_from[latest.name] = n
        bad_step = st.step - 1
        rollbacks, skipped = st.rollbacks + 1, st.skipped_steps
        self._load(latest)
        st.rollbacks, st.skipped_steps = rollbacks, skipped  # events stay counted across rollbacks
        self.metrics.print(f"[nan-guard] {self.cfg.run.max_nonfinite_in_row} non-finite steps in a row up to "
                           f"step {bad_step}: rolled back to {latest.name} (rollback #{st.rollbacks})")
        self.metrics.scalars({"train/rollbacks": st.rollbacks}, bad_step)
        self.metrics.text("train/events", f"rollback at step {bad_step} to {latest.name}", bad_step)
        return latest
