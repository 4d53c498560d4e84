"""The real trainer and the real sharder through SLURM on the local 2-node cluster.

2 virtual nodes x 1 task, DDP over gloo, a tiny U-Net on tiny real shards (h264 clips + tiny-BERT
embeddings made by data_pipeline.shard). Slow by nature (several processes on 2 shared cores);
every wait has a timeout and every test has its own run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shard_helpers import decode_mp4_bytes, tar_members
from slurm_helpers import (
    REPO,
    grace_time,
    job_state,
    require_cluster,
    require_partition,
    sbatch,
    set_grace_time,
    wait_batch_step_ended,
    wait_nodes_idle,
    wait_state,
)

from slurm import env as slurm_env
from trainer.demo import logged_losses, smoothed

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
# Step HOLD (0-based) waits mid-step for the signal (VDM_TEST_HOLD_AT_STEP of testing/fault_injection.py): the tests
# signal once rank 0 says it is waiting, so the save lands at exactly HOLD + 1 with steps still left
# however fast the machine is (unheld, 6 tiny steps can end before `scancel` arrives). Waiting for
# step HOLD-1's log line instead is a race: that line is written before the ranks agree on "stop?"
# for step HOLD-1, so a signal landing in between saved at HOLD (seen once in CI).
HOLD = 2
HOLD_LINE = f"[rank 0] VDM_TEST_HOLD_AT_STEP: step {HOLD} waits"
SHARD_SETS = ["--set", "clip.frames=8", "--set", "clip.height=16", "--set", "clip.width=16",
              "--samples-per-shard", "6", "--no-progress"]


FAULTS = "testing.fault_injection:FaultInjection"  # VDM_TEST_HOLD_AT_STEP reaches the job's trainer through it
# Enough learning for the loss to fall clearly within LEARN_STEPS of the tiny model: per-step losses
# swing with each step's noise levels, so the batch is larger (2 ranks x 4) and there is no warm-up.
# Measured here (seed fixed): first quarter 0.71 -> last quarter 0.53; with optim.lr=0 0.80 -> 0.80.
LEARN_STEPS = 16
LEARNS = {"optim.lr": 3e-3, "optim.warmup_steps": 0, "data.batch_size": 4}


def tiny_sets(shards: Path, out_dir: Path, steps: int, ckpt_every: int, extra: dict | None = None) -> list[str]:
    """A U-Net small enough that a 2-rank DDP step takes ~1 s on a loaded 2-core machine."""
    kv = {"data.shards": shards, "run.out_dir": out_dir, "run.steps": steps, "run.ckpt_every": ckpt_every,
          "parallel.strategy": "ddp", "parallel.backend": "gloo", "model.text_dim": 32,
          "model.base_channels": 8, "model.channel_mults": "[1,2]", "model.attention_resolutions": "[8]",
          "model.head_dim": 8, "model.cond_dim": 16, "model.groups": 4, "run.log_every": 1,
          "run.val_every": 0, "run.sample_every": 0, "data.batch_size": 1, "data.num_workers": 0,
          "data.num_image_frames": 0, "data.shuffle_buffer": 4, "run.callbacks": f"[{FAULTS}]",
          **(extra or {})}
    return [x for k, v in kv.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture(autouse=True)
def _cluster():
    require_cluster(min_nodes=2)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, synthetic_videos, tiny_bert_dir) -> Path:
    """Real shards (2 x 6 clips of 8x16x16) made locally by the sharding CLI."""
    require_cluster(min_nodes=2)  # session fixtures run before the autouse check: fail/skip early
    out = tmp_path_factory.mktemp("slurm_shards") / "local"
    r = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", "configs/shard/demo.yaml",
                        "--manifest", synthetic_videos, "--out", str(out), "--encoder", tiny_bert_dir,
                        "--workers", "1", *SHARD_SETS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "index.json").read_text())["total"] == 12
    return out


def logged_steps(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "train_log.jsonl").read_text().splitlines() if line]


def assert_loss_falls(out_dir: Path) -> None:
    """The mean loss of the last quarter of the run's steps is clearly below that of the first."""
    losses = logged_losses(out_dir / "train_log.jsonl")
    first, last = smoothed(losses, frac=0.25)
    assert last < 0.9 * first, f"the loss did not fall: first quarter {first:.3f}, last {last:.3f}: {losses}"


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_held(job: str, out: Path, timeout_s: float = 240) -> None:
    """Wait until rank 0 of an sbatch job with VDM_TEST_HOLD_AT_STEP=HOLD waits in that step."""
    deadline = time.monotonic() + timeout_s
    while HOLD_LINE not in _text(out):
        assert time.monotonic() < deadline, f"training did not reach the held step {HOLD} in time: {_text(out)[-3000:]}"
        assert wait_state(job, {"RUNNING", "PENDING", "COMPLETED", "FAILED"}, 30) in ("RUNNING", "PENDING"), \
            _text(out)[-3000:]
        time.sleep(0.5)


def tb_scalars(out_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[int, float] = {}
    for events in sorted((out_dir / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps.update({e.step: e.value for e in acc.Scalars(tag)})
    return sorted(steps.items())


def test_sbatch_train_sh_trains_on_two_nodes(tmp_path, tiny_shards):
    run = tmp_path / "run"
    job = sbatch([*TWO_NODES, f"--output={tmp_path}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  *tiny_sets(tiny_shards, run, steps=LEARN_STEPS, ckpt_every=LEARN_STEPS // 2, extra=LEARNS)])
    state = wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    log = (tmp_path / f"vdm-train-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    # both ranks on different nodes agree on the rendezvous
    port = slurm_env.master_port(job)
    assert f"rank 0/2 local_rank 0 node n1 MASTER_ADDR=n1 MASTER_PORT={port}" in log
    assert f"rank 1/2 local_rank 0 node n2 MASTER_ADDR=n1 MASTER_PORT={port}" in log
    assert (run / "checkpoints" / f"step-{LEARN_STEPS:06d}" / "trainer_state.json").exists()
    assert (run / "checkpoints" / f"step-{LEARN_STEPS // 2:06d}").exists()
    assert logged_steps(run) == list(range(LEARN_STEPS))
    assert [s for s, _ in tb_scalars(run, "train/loss")] == list(range(1, LEARN_STEPS + 1))
    assert_loss_falls(run)
    assert (run / "logs" / f"slurm-{job}.out").exists()


def test_submitit_launch_trains_on_two_nodes(tmp_path, tiny_shards):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "slurm.launch", "--config", "configs/demo.yaml",
                        *tiny_sets(tiny_shards, run, steps=LEARN_STEPS, ckpt_every=LEARN_STEPS, extra=LEARNS),
                        "--nodes", "2",
                        "--cpus-per-task", "1", "--time", "10", "--wait", "--wait-timeout", "300"],
                       cwd=REPO, capture_output=True, text=True, timeout=360)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"tensorboard --logdir {run / 'tb'}" in r.stdout
    results = eval(r.stdout.split("COMPLETED: ", 1)[1].strip(), {})  # list of per-rank dicts we printed
    assert [x["rank"] for x in results] == [0, 1] and {x["master_addr"] for x in results} == {"n1"}
    assert (run / "checkpoints" / f"step-{LEARN_STEPS:06d}").exists() and logged_steps(run) == list(range(LEARN_STEPS))
    assert [s for s, _ in tb_scalars(run, "train/loss")] == list(range(1, LEARN_STEPS + 1))
    assert_loss_falls(run)


def test_preempted_job_saves_requeues_and_resumes_without_repeating_steps(tmp_path, tiny_shards):
    """USR1 mid-run: checkpoint at step k, requeue, resume at k, finish at the target step."""
    run, steps = tmp_path / "run", 8
    job = sbatch([*TWO_NODES, f"--output={tmp_path}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  *tiny_sets(tiny_shards, run, steps=steps, ckpt_every=100)],
                 env={**os.environ, "VDM_TEST_HOLD_AT_STEP": str(HOLD)})
    wait_held(job, tmp_path / f"vdm-train-{job}.out")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    state = wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 400)
    log = (tmp_path / f"vdm-train-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "[signal] checkpoint at step " in log, log[-4000:]
    saved = int(log.split("[signal] checkpoint at step ", 1)[1].split()[0])
    assert saved == HOLD + 1, log[-3000:]
    assert "[resume]" in log and f"at step {saved}" in log.split("[resume]", 1)[1].splitlines()[0]
    assert "restart 1:" in log and "requeueing job" in log
    # one continuous loss log: every step exactly once, in order, across the requeue
    assert logged_steps(run) == list(range(steps))
    assert [s for s, _ in tb_scalars(run, "train/loss")] == list(range(1, steps + 1))
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert f"step-{saved:06d}" in ckpts and f"step-{steps:06d}" in ckpts


def test_cancelled_job_saves_is_not_requeued_and_a_resubmission_resumes(tmp_path, tiny_shards):
    """`scancel <job>` sends SIGTERM: the trainer saves at the step it was in, train.sh does not requeue
    (a cancel stays a cancel), and a new job with the same run.out_dir resumes there and finishes."""
    run, steps = tmp_path / "run", HOLD + 3
    args = [*TWO_NODES, f"--output={tmp_path}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
            *tiny_sets(tiny_shards, run, steps=steps, ckpt_every=100)]
    # the resubmission gets the hold too: a run resumed past the held step does not wait in it
    hold = {**os.environ, "VDM_TEST_HOLD_AT_STEP": str(HOLD)}
    job = sbatch(args, env=hold)
    out = tmp_path / f"vdm-train-{job}.out"
    wait_held(job, out)
    subprocess.run(["scancel", job], check=True, timeout=30)
    assert wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, 60) == "CANCELLED", _text(out)[-3000:]
    # train.sh could requeue the job (scontrol requeue) only while its batch step runs: once that step
    # has ended, the job is settled
    assert wait_batch_step_ended(job, 120) == "CANCELLED", _text(out)[-3000:]
    log = _text(out)
    assert f"[signal] checkpoint at step {HOLD + 1} written" in log, log[-3000:]
    assert "training tasks exited with code 75" in log and "not requeueing it here" in log, log[-3000:]
    assert "requeueing job" not in log and "restart 1:" not in log, log[-3000:]
    assert (run / "checkpoints" / f"step-{HOLD + 1:06d}" / "trainer_state.json").exists()
    assert logged_steps(run) == list(range(HOLD + 1))

    again = sbatch(args, env=hold)
    state = wait_state(again, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    log = _text(tmp_path / f"vdm-train-{again}.out")
    assert state == "COMPLETED", log[-4000:]
    assert "[resume]" in log and f"at step {HOLD + 1}" in log.split("[resume]", 1)[1].splitlines()[0], log[-3000:]
    assert logged_steps(run) == list(range(steps))  # every step once across the cancel
    assert (run / "checkpoints" / f"step-{steps:06d}" / "trainer_state.json").exists()
    assert job_state(job) == "CANCELLED"  # the cancelled job never came back


def test_shard_array_job_gives_the_same_shards_as_the_local_run(tmp_path, tiny_shards, synthetic_videos,
                                                               tiny_bert_dir):
    out = tmp_path / "slurm_shards"
    r = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", "configs/shard/demo.yaml",
                        "--manifest", synthetic_videos, "--out", str(out), "--encoder", tiny_bert_dir,
                        "--workers", "1", *SHARD_SETS, "--slurm", "--array-tasks", "2", "--cpus-per-task", "1",
                        "--time", "10"], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "submitted 2 array tasks" in r.stderr
    local_index = json.loads((tiny_shards / "index.json").read_text())
    slurm_index = json.loads((out / "index.json").read_text())
    assert slurm_index["shards"] == local_index["shards"] and slurm_index["total"] == 12
    assert slurm_index["config_hash"] == local_index["config_hash"]
    a, b = tar_members(tiny_shards), tar_members(out)  # "shard-N.tar/member" -> bytes
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith(".mp4") and a[name] != b[name]:  # x264 may differ in bytes, never in pixels
            assert (decode_mp4_bytes(a[name]) == decode_mp4_bytes(b[name])).all(), name
        else:  # captions, embeddings, metadata: byte-identical
            assert a[name] == b[name], name


def _wait_for_the_hold(job) -> None:
    """Until task 0 of a submitit job prints that it waits at step HOLD (VDM_TEST_HOLD_AT_STEP)."""
    deadline = time.monotonic() + 240
    while HOLD_LINE not in _text(job.paths.stdout):  # task 0's stdout
        assert time.monotonic() < deadline and not job.done(), "training did not reach step 2 in time"
        time.sleep(0.5)


def test_submitit_timeout_signal_checkpoints_through_the_trainer_and_resumes(tmp_path, tiny_shards, monkeypatch):
    """submitit's pre-timeout USR2 -> trainer saves (USR1) -> checkpoint() -> requeue -> exact resume."""
    from common.submitit_executor import make_executor
    from slurm.launch import TrainTask, wait_for

    run, steps = tmp_path / "run", 8
    monkeypatch.setenv("VDM_TEST_HOLD_AT_STEP", str(HOLD))  # exported to the job by sbatch
    ex = make_executor(run / "slurm" / "%j", nodes=2, tasks_per_node=1, cpus_per_task=1, time_min=10)
    job = ex.submit(TrainTask(str(REPO / "configs/demo.yaml"),
                              tiny_sets(tiny_shards, run, steps=steps, ckpt_every=100)[1::2], str(REPO)))
    _wait_for_the_hold(job)
    job._interrupt(timeout=True)  # exactly what SLURM sends signal_delay_s before the time limit
    ok, results = wait_for(job, 400)
    log = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert ok, f"{results}\n{log[-4000:]}"
    assert [r["restarts"] for r in results] == [1, 1], results
    assert "checkpoint(): trainer exited with code 75 (saved)" in log  # submitit's Checkpointable path
    assert "[signal] checkpoint at step " in log, log[-4000:]
    saved = int(log.split("[signal] checkpoint at step ", 1)[1].split()[0])
    assert saved == HOLD + 1 and f"at step {saved}" in log.split("[resume]", 1)[1].splitlines()[0]
    assert logged_steps(run) == list(range(steps))
    assert [s for s, _ in tb_scalars(run, "train/loss")] == list(range(1, steps + 1))


@pytest.mark.parametrize("grace_s", [0, 30])
def test_submitit_preempted_trainer_saves_requeues_and_resumes(tmp_path, tiny_shards, monkeypatch, grace_s):
    """slurm.launch's job preempted at step HOLD by an `urgent` job (debug's GraceTime 0 and 30): the
    real trainer saves at HOLD + 1 on SIGTERM (twice with GraceTime=0, and SIGKILL KillWait later), the
    same job resumes there, and wait_for reports both ranks' results of the second attempt."""
    from common.submitit_executor import make_executor
    from slurm.launch import TrainTask, wait_for

    require_partition("urgent")
    run, steps = tmp_path / "run", 8
    monkeypatch.setenv("VDM_TEST_HOLD_AT_STEP", str(HOLD))  # exported to the job by sbatch
    before = grace_time("debug")
    set_grace_time("debug", grace_s)
    job = None
    urgent = ""
    try:
        ex = make_executor(run / "slurm" / "%j", nodes=2, tasks_per_node=1, cpus_per_task=1, time_min=10,
                           extra_sbatch=["exclusive"])  # the urgent job then preempts this job only
        job = ex.submit(TrainTask(str(REPO / "configs/demo.yaml"),
                                  tiny_sets(tiny_shards, run, steps=steps, ckpt_every=100)[1::2], str(REPO)))
        _wait_for_the_hold(job)
        urgent = sbatch(["-p", "urgent", "-w", "n1", "--exclusive", "--time=1", f"--output={tmp_path}/urgent-%j.out",
                         "--wrap", "sleep 3"])
        ok, results = wait_for(job, 400)
    finally:
        set_grace_time("debug", before)
        if job is not None:
            subprocess.run(["scancel", job.job_id, *([urgent] if urgent else [])], capture_output=True, timeout=30)
    log = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert ok, f"{results}\n{log[-4000:]}"
    assert [r["restarts"] for r in results] == [1, 1], results
    assert "[signal] checkpoint at step " in log, log[-4000:]
    saved = int(log.split("[signal] checkpoint at step ", 1)[1].split()[0])
    assert saved == HOLD + 1 and f"at step {saved}" in log.split("[resume]", 1)[1].splitlines()[0]
    assert ("SLURM has requeued the job" if grace_s == 0 else f"requeueing job {job.job_id}") in log, log[-4000:]
    assert logged_steps(run) == list(range(steps))
    assert [s for s, _ in tb_scalars(run, "train/loss")] == list(range(1, steps + 1))


def _reference_digests(tmp_path: Path, shards: Path, steps: int) -> list[str]:
    """batch_digest per step of an uninterrupted 1-process run of the same config (no SLURM)."""
    ref = tmp_path / "reference"
    sets = tiny_sets(shards, ref, steps=steps, ckpt_every=100) + ["--set", "parallel.strategy=single",
                                                                   "--set", "data.streams=2"]
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", "configs/demo.yaml", *sets], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return [json.loads(line)["batch_digest"] for line in (ref / "train_log.jsonl").read_text().splitlines()]


def test_job_preempted_on_two_nodes_is_requeued_on_one_and_continues_the_sample_sequence(tmp_path, tiny_shards):
    """A 2-node job loses a node (n2 drained), is preempted (USR1 saves at HOLD + 1) and requeued;
    its size is widened to the range 1-2 nodes (1 task) while it waits, so it restarts on n1 alone,
    where train.sh starts as many tasks as the allocation has (SLURM_NTASKS keeps the old 2). The
    trainer resumes on 1 rank with no flag, and (data.streams=2, a multiple of both global batch
    sizes) each step after the resume trains on the very samples an uninterrupted 1-rank run trains on
    after the same number of samples. (This SLURM packs a range onto the fewest free nodes, so the
    test sets the first allocation's size explicitly instead of submitting the range.)"""
    run, steps = tmp_path / "run", HOLD + 4
    wait_nodes_idle(["n1", "n2"], 120)
    job = sbatch([*TWO_NODES, f"--output={tmp_path}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  *tiny_sets(tiny_shards, run, steps=steps, ckpt_every=100), "--set", "data.streams=2"],
                 env={**os.environ, "VDM_TEST_HOLD_AT_STEP": str(HOLD)})
    out = tmp_path / f"vdm-train-{job}.out"
    try:
        wait_held(job, out)
        assert "rank 1/2" in _text(out)
        subprocess.run(["scontrol", "update", "nodename=n2", "state=drain", "reason=elastic-test"], check=True,
                       timeout=30)
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        deadline = time.monotonic() + 240
        while "requeueing job" not in _text(out):  # saved and requeued: now pending, n2 is drained
            assert time.monotonic() < deadline, _text(out)[-3000:]
            time.sleep(0.5)
        wait_state(job, {"PENDING"}, 60)
        subprocess.run(["scontrol", "update", f"jobid={job}", "NumNodes=1-2", "NumTasks=1"], check=True, timeout=30)
        state = wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 400)
    finally:
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], capture_output=True, timeout=30)
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    log = _text(out)
    assert state == "COMPLETED", log[-4000:]
    saved = int(log.split("[signal] checkpoint at step ", 1)[1].split()[0])
    assert saved == HOLD + 1, log[-3000:]
    second = log.split("restart 1:", 1)[1]
    assert "rank 0/1" in second and "rank 1/" not in second, second[-3000:]
    assert "global batch" in second  # the changed global batch size (2 -> 1) is named in a warning
    assert logged_steps(run) == list(range(steps))
    digests = {json.loads(line)["step"]: json.loads(line)["batch_digest"]
               for line in (run / "train_log.jsonl").read_text().splitlines()}
    # steps 0..saved-1 took 2 samples each; a 1-rank run reaches the same sample at step 2 * saved
    reference = _reference_digests(tmp_path, tiny_shards, 2 * saved + steps - saved)
    assert [digests[s] for s in range(saved, steps)] == reference[2 * saved:]
