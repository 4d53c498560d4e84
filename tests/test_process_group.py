"""tests/process_group.run: a timed-out command takes its grandchildren with it (no orphaned ranks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import process_group
import pytest

SPAWNS_A_GRANDCHILD = ("import subprocess, sys, time; "
                       "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                       "print(p.pid, flush=True); time.sleep(120)")


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (killed, not yet reaped by init) counts as gone."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_timeout_kills_the_whole_process_group():
    with pytest.raises(subprocess.TimeoutExpired) as e:
        process_group.run([sys.executable, "-c", SPAWNS_A_GRANDCHILD], capture_output=True, text=True, timeout=5)
    grandchild = int(e.value.output.split()[0])
    assert not _alive(grandchild)


def test_a_normal_run_returns_like_subprocess_run():
    r = process_group.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                          capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    with pytest.raises(subprocess.CalledProcessError):
        process_group.run([sys.executable, "-c", "raise SystemExit(2)"], check=True, timeout=60)
