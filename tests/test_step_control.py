"""The loop's bookkeeping rules (trainer/step_control.py), one by one."""

from __future__ import annotations

import math

from trainer.step_control import Interval, NonFiniteGuard, SaveSchedule, StepResult


def result(ok: bool = True, loss: float = 0.5, videos: int = 2, wait: float = 0.1) -> StepResult:
    return StepResult(loss=loss, grad_norm=1.0, lr=1e-3, ok=ok, data_wait=wait, videos=videos,
                      batch_digest="ab", overhead=0.0)


def test_saves_every_k_steps_and_at_the_end_once_each():
    s, saves = SaveSchedule(every=2, last_step=5), []
    for step in range(1, 6):
        if s.due(step, in_streak=False, stop=False):
            s.saved(step)
            saves.append(step)
    assert saves == [2, 4, 5]


def test_a_save_inside_a_non_finite_streak_waits_for_the_next_finite_step():
    s = SaveSchedule(every=2, last_step=10)
    assert not s.due(2, in_streak=True, stop=False)
    assert not s.due(3, in_streak=True, stop=False)
    assert s.due(4, in_streak=False, stop=False)  # the streak ended: the pending save happens now
    s.saved(4)
    assert not s.due(5, in_streak=False, stop=False)


def test_a_stop_signal_saves_even_mid_streak_but_never_the_same_step_twice():
    s = SaveSchedule(every=0, last_step=10, last_saved=3)  # resumed at step 3: already saved there
    assert not s.due(3, in_streak=False, stop=True)
    assert s.due(4, in_streak=True, stop=True)


def test_a_rollback_cancels_the_pending_save():
    s = SaveSchedule(every=2, last_step=10)
    assert not s.due(2, in_streak=True, stop=False)
    s.cancel()
    assert not s.due(3, in_streak=False, stop=False)


def test_the_guard_rolls_back_after_limit_non_finite_steps_in_a_row_and_restarts_the_count():
    g = NonFiniteGuard(limit=2)
    assert [g.record(result(ok), fp16=False) for ok in (False, True, False, False, False, False)] == [
        False, False, False, True, False, True]
    assert not g.in_streak


def test_fp16_overflow_with_a_finite_loss_is_skipped_but_never_rolls_back():
    g = NonFiniteGuard(limit=1)
    assert not g.record(result(ok=False, loss=0.3), fp16=True) and not g.in_streak
    assert g.record(result(ok=False, loss=math.nan), fp16=True)
    assert g.record(result(ok=False, loss=0.3), fp16=False)  # bf16/fp32: a non-finite gradient counts


def test_the_interval_averages_only_finite_losses():
    iv = Interval()
    iv.add(result(loss=1.0), 2.0)
    iv.add(result(ok=False, loss=math.nan, videos=3, wait=0.5), 4.0)
    assert iv.mean_loss == 1.0 and iv.steps == 2 and iv.videos == 5 and iv.step_time == 3.0
    assert math.isclose(iv.wait, 0.6)
    assert math.isnan(Interval().mean_loss)
    assert result().log_record(7) == {"step": 7, "loss": 0.5, "grad_norm": 1.0, "lr": 1e-3, "skipped": False,
                                      "batch_digest": "ab"}
