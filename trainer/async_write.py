"""Checkpoint files written by a background thread from a copy taken now, so training goes on.

A save that does not stall training needs two things: a copy of the state that the next optimizer
step cannot change (staging: one memcpy into fresh CPU memory, the only part the step waits for) and
a thread that serialises and writes that copy while the next steps run. DCP's `async_save` does both
for the strategies that save through it; `BackgroundWriter` does the same for plain `torch.save`
files (DeepSpeed's engine files, its per-rank EMA).

Completion is reported as a `concurrent.futures.Future`; `all_of` joins several into one.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch


def stage(obj: Any) -> Any:
    """A copy of `obj` that later in-place updates cannot reach: every tensor copied into new CPU
    memory (views of one storage become separate tensors: the file may only get smaller), dicts,
    lists and tuples rebuilt with the same keys, anything else deep-copied (DeepSpeed's loss scaler and enum records)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and attributes (a state dict's `_metadata`)
        for k, v in obj.items():
            out[k] = stage(v)
        return out
    if isinstance(obj, list | tuple):
        items = [stage(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return copy.deepcopy(obj)


def done() -> Future:
    """A future that has already succeeded: what a synchronous write returns."""
    f: Future = Future()
    f.set_result(None)
    return f


def all_of(futures: Sequence[Future]) -> Future:
    """One future that succeeds when all of `futures` have, or fails with the first failure."""
    joined: Future = Future()
    remaining = len(futures)
    if remaining == 0:
        joined.set_result(None)
        return joined
    lock = threading.Lock()

    def on_done(f: Future) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
            if joined.done():
                return
            if f.exception() is not None:
                joined.set_exception(f.exception())
            elif last:
                joined.set_result(None)

    for f in futures:
        f.add_done_callback(on_done)
    return joined


def save(obj: Any, path: str | Path, *, background: bool) -> Future:
    """torch.save now, or of a staged copy in a background thread."""
    if not background:
        torch.save(obj, str(path))
        return done()
    writer = BackgroundWriter()
    writer.save(obj, path)
    return writer.finished()


class BackgroundWriter:
    """`torch.save` of staged copies in one worker thread, in submission order."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._futures: list[Future] = []

    def save(self, obj: Any, path: str | Path, **torch_save_kwargs) -> None:
        """Stage `obj` now; write it to `path` in the background."""
        staged = stage(obj)
        self._futures.append(self._pool.submit(torch.save, staged, str(path), **torch_save_kwargs))

    def finished(self) -> Future:
        """One future for everything submitted so far; the thread exits once it is all written."""
        joined = all_of(self._futures)
        self._futures = []
        self._pool.shutdown(wait=False)
        return joined
