"""Worker processes that end when the process they work for ends, however it ends.

A `kill -9` runs no cleanup, so a worker must notice by itself. Two cases need this:

- workers under the `forkserver` start method (training-loader workers and `data_pipeline.shard`'s
  workers): they are children of the forkserver, not of the process they work for, and each holds
  the forkserver's "clients alive" pipe, so after that process dies the forkserver never exits, a
  parent-death signal (whose parent is the forkserver) never fires, and the workers would run
  forever (the shard CLI's two workers and forkserver held 1.25 GB after a kill -9 of the CLI).
  They watch the pid of the process they work for; once they are gone the forkserver exits too.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait_for_exit(pid: int, poll_s: float) -> None:
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has exited
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
        return
    while True:  # no pidfd (older kernel, macOS), or the process is already gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        time.sleep(poll_s)


def exit_when_process_exits(pid: int, poll_s: float = 1.0) -> threading.Thread:
    """Start a daemon thread that ends this process (exit status 1, no cleanup) once `pid` is gone."""

    def watch() -> None:
        _wait_for_exit(pid, poll_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name=f"exit-when-{pid}-exits", daemon=True)
    thread.start()
    return thread
