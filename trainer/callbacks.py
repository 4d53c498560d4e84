"""Callbacks: code a run carries into the training loop without the loop knowing it (`run.callbacks`).

A research engineer adds a profiler window, a custom metric or a fault injection by naming a class
in the config (`run.callbacks: ["my_pkg.hooks:Profiler"]`) instead of editing the loop (`trainer/loop.py`).
The trainer's own tests inject NaN batches, kills and held steps this way
(`testing/fault_injection.py`), so the production loop carries no test switches.

Each hook gets the `Trainer`; every rank runs every callback, so a hook that talks to other ranks
must do so on all of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from torch import Tensor


class Callback:
    """Base class: override the hooks you need; the others do nothing."""

    def on_step_start(self, trainer) -> None:
        """Before the step's first batch is drawn (`trainer.step` is the step about to run)."""

    def on_batch(self, trainer, x: Tensor) -> Tensor:
        """The step's clean video batch [B, C, T, H, W] on its device, before noise is added; return it
        (or a replacement) to train on."""
        return x

    def before_optimizer_step(self, trainer, first_step: int) -> None:
        """After every micro-batch's backward, before the gradient clip and optimizer step.
        `first_step` is the step this process started (or resumed) at."""

    def during_checkpoint_write(self, trainer) -> None:
        """Inside a checkpoint write: every rank's files are in the temporary directory, which is not
        yet renamed to its final name (a crash here must leave the previous checkpoint the latest)."""


class Callbacks(Callback):
    """Several callbacks called in order; `on_batch` threads the batch through each."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_step_start(self, trainer) -> None:
        for c in self.callbacks:
            c.on_step_start(trainer)

    def on_batch(self, trainer, x: Tensor) -> Tensor:
        for c in self.callbacks:
            x = c.on_batch(trainer, x)
        return x

    def before_optimizer_step(self, trainer, first_step: int) -> None:
        for c in self.callbacks:
            c.before_optimizer_step(trainer, first_step)

    def during_checkpoint_write(self, trainer) -> None:
        for c in self.callbacks:
            c.during_checkpoint_write(trainer)


def load_callback(spec: str) -> Callback:
    """"package.module:ClassName" → an instance (built with no arguments). Errors name the spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"run.callbacks entry {spec!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"run.callbacks entry {spec!r}: cannot import {module_name}: {e}") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"run.callbacks entry {spec!r}: {module_name} has no {attr}")
    callback = cls()
    if not isinstance(callback, Callback):
        raise ValueError(f"run.callbacks entry {spec!r}: {attr} is not a trainer.callbacks.Callback")
    return callback


def load_callbacks(specs: Sequence[str]) -> Callbacks:
    return Callbacks([load_callback(s) for s in specs])
