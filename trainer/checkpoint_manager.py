"""The run's checkpoints as one component, as torchtitan's trainer hands them to its checkpointer:
save (synchronously or in the background), commit a background save between steps, resume a rerun,
roll back after a non-finite streak, and warm-start a new run (`run.init_from`).

The files themselves (layout, atomic rename, loading across strategies and world sizes) are
trainer/checkpoint.py; this module decides when and with what: the loop's counters (`TrainState`),
the EMA and every rank's loader position travel with the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

from common.config import to_dict
from trainer import checkpoint as ckpt
from trainer.step_control import TrainState

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
        batch iterator: the loader's position changed."""
        if latest is None:
            if self.rank == 0:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            return None
        self._load(latest)
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
