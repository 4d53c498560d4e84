"""A stop signal at the end of training: the run is complete and saved, so it must exit 0, not ask
for a requeue (75) and not die from the signal while shutting down (128+10 reads as "requeue me" to
slurm/train.sh and slurm.launch). Found in CI: a USR1 landing after the last step requeued a finished
job, which then resumed at its last step just to exit."""

from __future__ import annotations

import signal
import subprocess

from trainer_helpers import (
    REPO,
    step_log,
    subprocess_env,
    tiny_config,
    train_cmd,
    wait_for_line,
)

from trainer.checkpoint import find_latest, read_state


def test_usr1_during_the_last_step_and_during_shutdown_finishes_with_exit_0(tmp_path, trainer_shards):
    shards, _ = trainer_shards
    out, steps = tmp_path / "run", 3
    cfg = tiny_config(tmp_path / "c.yaml", shards, out, run={"steps": steps, "ckpt_every": 0})
    # the last step (index steps-1) waits mid-step for the signal: it lands at a known moment
    proc = subprocess.Popen(train_cmd(cfg), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(VDM_TEST_HOLD_AT_STEP=str(steps - 1)))
    lines: list[str] = []
    try:
        wait_for_line(proc, f"step {steps - 1} waits for SIGUSR1", lines)
        proc.send_signal(signal.SIGUSR1)
        wait_for_line(proc, "arrived at the end of training", lines)
        # a second one while the finished process tears down (a no-op if it has already exited)
        proc.send_signal(signal.SIGUSR1)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "exiting with 0 (finished, not requeued)" in output and "exiting with 75" not in output
    latest = find_latest(out)
    assert latest.name == f"step-{steps:06d}" and read_state(latest)["step"] == steps
    assert sorted(step_log(out)) == list(range(steps))


def test_hold_hook_does_not_hold_a_run_resumed_past_it(tmp_path, trainer_shards):
    """VDM_TEST_HOLD_AT_STEP stays set across a requeue: the resumed run must not wait again."""
    shards, _ = trainer_shards
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", shards, out, run={"steps": 2, "ckpt_every": 2})
    first = subprocess.run(train_cmd(cfg), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                           timeout=180)
    assert first.returncode == 0, first.stdout + first.stderr
    r = subprocess.run(train_cmd(cfg, "run.steps=3"), cwd=REPO, capture_output=True, text=True, timeout=180,
                       env=subprocess_env(VDM_TEST_HOLD_AT_STEP="2"))  # = its first step
    assert r.returncode == 0 and "waits for SIGUSR1" not in r.stdout, r.stdout + r.stderr
    assert read_state(find_latest(out))["step"] == 3
