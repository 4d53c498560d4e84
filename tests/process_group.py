"""`subprocess.run` for the tests' multi-process commands, without orphans.

A test that times out while torchrun, a DeepSpeed launcher or a loader's worker pool runs would kill
only the direct child with plain `subprocess.run`; the grandchildren (the ranks) keep running, hold
CPU and ports, and slow or break the next tests. Here the command gets its own session, and a
timeout kills the whole process group before the TimeoutExpired propagates.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile

# The wall-clock limit of every multi-process command the tests run (torchrun, a DeepSpeed launch, ranks
# started by hand): one number, sized for a loaded 2-core machine (a 2-rank launch of the tiny model
# takes 20-90 s there), so that a hang fails the test instead of holding the suite for ever.
MULTI_PROCESS_TIMEOUT_S = 600


def run(cmd, *, timeout: float | None = None, capture_output: bool = False, check: bool = False,
        **popen_kwargs) -> subprocess.CompletedProcess:
    if capture_output:
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, **popen_kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            kill_group(proc)
            e.output, e.stderr = proc.communicate()
            raise
        except BaseException:
            kill_group(proc)
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the child's session (it is the group leader)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextlib.contextmanager
def gloo_group_of_one():
    """A real gloo process group of this one process (file store), destroyed afterwards."""
    import torch.distributed as dist

    fd, store = tempfile.mkstemp(prefix="gloo-store-")
    os.close(fd)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        with contextlib.suppress(FileNotFoundError):
            os.remove(store)
