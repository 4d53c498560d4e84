"""Faults the trainer's tests inject into real training processes, as a `run.callbacks` entry.

    --set 'run.callbacks=[testing.fault_injection:FaultInjection]'

The faults are chosen by environment variables, read when the callback is built, so a test can aim
them at one process of a torchrun or sbatch job that shares the config (harmless when unset):
  VDM_TEST_NAN_STEPS="5,6"   replace the batch of these (0-based) steps with NaNs, once each
  VDM_TEST_KILL_AT_STEP=N    SIGKILL this process when step N (0-based) is about to start
  VDM_TEST_SLEEP_IN_SAVE=S   sleep S seconds inside a checkpoint write (after printing a marker line)
  VDM_TEST_KILL_IN_SAVE_AT_STEP=N  SIGKILL this process inside the checkpoint write of step N (steps
                             done), with run.async_save while its files are still being written
  VDM_TEST_HOLD_AT_STEP=N    step N (0-based) waits mid-step, up to 120 s, for SIGUSR1/SIGTERM: a test
                             can signal a multi-node job at a known step with steps left (a run
                             resumed at or after step N does not wait)
"""

from __future__ import annotations

import os
import signal
import time

import torch

from trainer.callbacks import Callback

SPEC = "testing.fault_injection:FaultInjection"
ENV_VARS = ("VDM_TEST_NAN_STEPS", "VDM_TEST_KILL_AT_STEP", "VDM_TEST_SLEEP_IN_SAVE", "VDM_TEST_HOLD_AT_STEP",
            "VDM_TEST_KILL_IN_SAVE_AT_STEP")
HOLD_FOR_SIGNAL_S = 120.0
WRITE_MARKER = "CHECKPOINT-WRITE-IN-PROGRESS"


def _steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").replace(" ", "").split(",") if s}


def _step(name: str) -> int | None:
    raw = os.environ.get(name, "")
    return int(raw) if raw else None


class FaultInjection(Callback):
    def __init__(self) -> None:
        self.nan_steps = _steps("VDM_TEST_NAN_STEPS")
        self.kill_at = _step("VDM_TEST_KILL_AT_STEP")
        self.hold_at = _step("VDM_TEST_HOLD_AT_STEP")
        self.kill_in_save_at = _step("VDM_TEST_KILL_IN_SAVE_AT_STEP")
        self.sleep_in_save = float(os.environ.get("VDM_TEST_SLEEP_IN_SAVE", "0") or 0)

    def on_step_start(self, trainer) -> None:
        if self.kill_at is not None and trainer.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_batch(self, trainer, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float("nan")) if trainer.step in self.nan_steps else x

    def before_optimizer_step(self, trainer, first_step: int) -> None:
        """NaN steps fire once (a rollback replays them clean); a held step waits for a stop signal,
        so a test's signal lands at a known step with steps left however fast the machine is."""
        self.nan_steps.discard(trainer.step)
        if self.hold_at is None or trainer.step != self.hold_at or first_step >= self.hold_at:
            return
        print(f"[rank {trainer.rank}] VDM_TEST_HOLD_AT_STEP: step {trainer.step} waits for SIGUSR1/SIGTERM",
              flush=True)
        deadline = time.monotonic() + HOLD_FOR_SIGNAL_S
        while not trainer.stop_requested and time.monotonic() < deadline:
            time.sleep(0.05)

    def during_checkpoint_write(self, trainer) -> None:
        if self.kill_in_save_at is not None and trainer.step == self.kill_in_save_at:
            print(f"[rank {trainer.rank}] VDM_TEST_KILL_IN_SAVE_AT_STEP: killed inside the save of step "
                  f"{trainer.step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sleep_in_save > 0:
            print(WRITE_MARKER, flush=True)
            time.sleep(self.sleep_in_save)
