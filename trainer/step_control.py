"""The loop's bookkeeping as small objects: what a step reports, what a log line sums, when to save,
when a run of non-finite steps calls for a rollback.

Why apart from `Trainer.train`: each rule here (never checkpoint inside a non-finite streak, never
save the same step twice, a signal always saves) is a decision about integers that deserves its own
test, and the loop then reads as the order of events, as torchtitan's trainer hands saving to its
checkpointer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TrainState:
    """The counters a checkpoint carries besides the weights, shared by the loop (which advances them)
    and the checkpoint manager (which saves, resumes and rolls them back)."""

    step: int = 0  # optimizer steps done
    skipped_steps: int = 0  # non-finite steps skipped, over the whole run (rollbacks included)
    rollbacks: int = 0
    text_encoder: str = ""  # the encoder the shards' captions were embedded with (sampling, evaluation)

    def checkpoint_fields(self) -> dict:
        """What trainer_state.json holds of these (the step is written by the checkpoint itself)."""
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks, "text_encoder": self.text_encoder}


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports to the loop."""

    loss: float  # mean over micro-batches and ranks
    grad_norm: float
    lr: float
    ok: bool  # loss and gradient finite: the optimizer and the EMA were updated
    data_wait: float  # seconds this rank waited for batches
    videos: int  # clips this rank trained on
    batch_digest: str  # the global batch's sorted sample keys, hashed (trainer.batches.batch_digest)
    overhead: float  # seconds of one-off start-up work inside the step (the FLOP count): not step time
    aux: dict[str, float] = field(default_factory=dict)  # the model's auxiliary losses (unweighted), as `loss`

    @property
    def loss_finite(self) -> bool:
        return math.isfinite(self.loss)

    def log_record(self, step: int) -> dict:
        """The step's line in train_log.jsonl."""
        return {"step": step, "loss": self.loss, **self.aux, "grad_norm": self.grad_norm, "lr": self.lr,
                "skipped": not self.ok, "batch_digest": self.batch_digest}


@dataclass
class Interval:
    """Sums over the steps since the last log line."""

    seconds: float = 0.0
    wait: float = 0.0
    steps: int = 0
    videos: int = 0
    loss_sum: float = 0.0
    finite_losses: int = 0
    aux_sums: dict[str, float] = field(default_factory=dict)  # over the steps with a finite loss

    def add(self, out: StepResult, seconds: float) -> None:
        self.seconds += seconds
        self.wait += out.data_wait
        self.steps += 1
        self.videos += out.videos
        if out.loss_finite:
            self.loss_sum += out.loss
            self.finite_losses += 1
            for name, value in out.aux.items():
                self.aux_sums[name] = self.aux_sums.get(name, 0.0) + value

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.finite_losses if self.finite_losses else float("nan")

    @property
    def mean_aux(self) -> dict[str, float]:
        """Each auxiliary loss's mean over the interval's steps with a finite loss."""
        return {name: total / self.finite_losses for name, total in self.aux_sums.items()}

    @property
    def step_time(self) -> float:
        return self.seconds / max(1, self.steps)


class NonFiniteGuard:
    """Counts non-finite steps in a row; at `limit` the run rolls back to its last checkpoint.

    fp16 steps whose loss is finite but whose gradients overflowed are the loss scaler's business
    (it lowers the scale and the step is skipped), so they do not count towards a rollback."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.in_row = 0

    @property
    def in_streak(self) -> bool:
        return self.in_row > 0

    def record(self, out: StepResult, fp16: bool) -> bool:
        """True when this step completes a streak that calls for a rollback (the count restarts)."""
        if out.ok:
            self.in_row = 0
            return False
        if not (fp16 and out.loss_finite):
            self.in_row += 1
        if self.in_row >= self.limit:
            self.in_row = 0
            return True
        return False


class SaveSchedule:
    """When to checkpoint: every `every` steps (0 = only at the end) and at `last_step`; never inside a
    non-finite streak (a rollback must land before it, so the save waits for the next finite step);
    always when a stop signal arrived; never the same step twice (a resumed run starts saved)."""

    def __init__(self, every: int, last_step: int, last_saved: int = -1):
        self.every, self.last_step, self.last_saved = every, last_step, last_saved
        self.pending = False

    def due(self, step: int, *, in_streak: bool, stop: bool) -> bool:
        """Called once after each step (`step` = steps done); True = save now."""
        if (self.every > 0 and step % self.every == 0) or step == self.last_step:
            self.pending = True
        if not ((self.pending and not in_streak) or stop):
            return False
        self.pending = False
        return self.last_saved != step

    def saved(self, step: int) -> None:
        self.last_saved = step

    def cancel(self) -> None:
        """After a rollback: the pending save was for steps that no longer count."""
        self.pending = False
