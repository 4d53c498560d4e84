"""trainer.distributed.exit_process: how our distributed commands end.

Once a process has been in a gloo group it leaves with os._exit (the interpreter's teardown can abort
it with SIGABRT while gloo threads kept alive by DTensor's caches still run; see the docstring), so
what matters here is what must still happen: the exit code arrives, buffered stdout and log records
are written, and a process that never joined a group exits the ordinary way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
from process_group import MULTI_PROCESS_TIMEOUT_S
from trainer_helpers import PY, subprocess_env

ROOT = Path(__file__).resolve().parents[1]

COMMAND = textwrap.dedent("""
    import atexit, logging, os, sys
    sys.path.insert(0, {root!r})
    import torch
    from trainer.distributed import exit_process, init_distributed, leave_process_group_on_exit

    env = init_distributed()
    logging.basicConfig(filename=os.path.join({out!r}, f"rank{{env.rank}}.log"), level=logging.INFO)
    atexit.register(lambda: print("interpreter teardown ran", flush=True))
    with leave_process_group_on_exit():
        gathered = [0]
        if env.world_size > 1:
            # a DTensor collective: DTensor's caches then keep the mesh and the gloo group alive past
            # destroy_process_group, the situation exit_process is for
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor
            mesh = init_device_mesh("cpu", (env.world_size,))
            gathered = distribute_tensor(torch.arange(4.0), mesh, [Shard(0)]).full_tensor().tolist()
        logging.getLogger("probe").info("rank %d gathered %s", env.rank, gathered)
        print(f"rank {{env.rank}} finished")  # stdout is a pipe here: block-buffered, not yet written
    exit_process(int(sys.argv[1]))
""")


def _command(tmp: Path) -> Path:
    path = tmp / "command.py"
    path.write_text(COMMAND.format(root=str(ROOT), out=str(tmp)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(tmp: Path, world_size: int, code: int) -> list[subprocess.Popen]:
    """The ranks as srun starts them: rank variables in the environment, stdout a buffered pipe."""
    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world_size))
    env.pop("PYTHONUNBUFFERED")
    return [subprocess.Popen([PY, str(_command(tmp)), str(code)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for r in range(world_size)]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    try:
        return [(p.returncode, out) for p in procs for out, _ in [p.communicate(timeout=MULTI_PROCESS_TIMEOUT_S)]]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.parametrize("code", [0, 3])
def test_two_ranks_exit_with_the_code_and_their_output_written(tmp_path, code):
    for rank, (returncode, out) in enumerate(_finish(_start_ranks(tmp_path, 2, code))):
        assert returncode == code, out
        assert f"rank {rank} finished" in out, out
        assert "interpreter teardown ran" not in out and "terminate called" not in out, out
        assert f"rank {rank} gathered [0.0, 1.0, 2.0, 3.0]" in (tmp_path / f"rank{rank}.log").read_text()


def test_a_process_that_joined_no_group_exits_the_ordinary_way(tmp_path):
    [(returncode, out)] = _finish(_start_ranks(tmp_path, 1, 5))
    assert returncode == 5, out
    assert "rank 0 finished" in out and "interpreter teardown ran" in out, out
    assert "rank 0 gathered [0]" in (tmp_path / "rank0.log").read_text()
