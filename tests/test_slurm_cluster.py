"""Both launch paths on the real local SLURM cluster (2 virtual nodes), with a probe as the trainer.

The probe (tests/slurm_probe.py) keeps the trainer's contract: same CLI, SIGUSR1/SIGTERM -> "save"
and exit 75. These tests prove the launch mechanics (ranks, rendezvous, signal forwarding,
requeue, crash reports); tests/test_slurm_training.py runs the real trainer the same way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_helpers import (
    REPO,
    grace_time,
    probe_env,
    require_cluster,
    require_partition,
    sbatch,
    set_grace_time,
    wait_batch_step_ended,
    wait_file,
    wait_state,
)

from slurm import env as slurm_env

pytestmark = pytest.mark.slurm

SMALL = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5"]


@pytest.fixture(autouse=True)
def _cluster():
    require_cluster(min_nodes=2)


def _records(out_dir, restart=0):
    return sorted((json.loads(p.read_text()) for p in out_dir.glob(f"probe-rank*-restart{restart}.json")),
                  key=lambda r: r["RANK"])


def test_train_sh_two_nodes_ranks_and_rendezvous(tmp_path):
    run = tmp_path / "run"
    job = sbatch([*SMALL, f"--output={tmp_path}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  "--set", f"run.out_dir={run}"], env=probe_env())
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 90) == "COMPLETED"
    recs = _records(run)
    assert [r["RANK"] for r in recs] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in recs} == {"2"} and {r["LOCAL_RANK"] for r in recs} == {"0"}
    assert {r["SLURMD_NODENAME"] for r in recs} == {"n1", "n2"}
    # all ranks agree on the rendezvous, and it is the same derivation slurm.env gives
    assert {(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in recs} == {("n1", str(slurm_env.master_port(job)))}
    assert {r["OMP_NUM_THREADS"] for r in recs} == {"1"}
    log = (tmp_path / f"vdm-train-{job}.out").read_text()
    assert log.count("MASTER_ADDR=n1") >= 3 and "training tasks exited with code 0" in log
    # the job's log is reachable from the run directory
    assert (run / "logs" / f"slurm-{job}.out").resolve() == (tmp_path / f"vdm-train-{job}.out").resolve()


def _require_fake_gpus():
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30).stdout
    if "gpu:" not in gres:  # a skip fails under CI=true (conftest.py)
        pytest.skip(f"the cluster has no GPU GRES ({gres.strip()!r}); local_cluster.sh up gives 2 fake GPUs per node")


def test_train_sh_one_task_per_gpu(tmp_path):
    """--gpus-per-node=2 --ntasks-per-node=2 on 2 nodes: 4 ranks, local ranks 0/1 on each node."""
    _require_fake_gpus()
    run = tmp_path / "run"
    job = sbatch(["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=5",
                  f"--output={tmp_path}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  "--set", f"run.out_dir={run}"], env=probe_env())
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 90) == "COMPLETED"
    recs = _records(run)
    assert [r["RANK"] for r in recs] == ["0", "1", "2", "3"] and {r["WORLD_SIZE"] for r in recs} == {"4"}
    by_node = {(r["SLURMD_NODENAME"], r["LOCAL_RANK"]) for r in recs}
    assert by_node == {("n1", "0"), ("n1", "1"), ("n2", "0"), ("n2", "1")}
    assert {r["LOCAL_WORLD_SIZE"] for r in recs} == {"2"} and {r["MASTER_ADDR"] for r in recs} == {"n1"}
    assert {r["CUDA_VISIBLE_DEVICES"] for r in recs} == {"0,1"}  # LOCAL_RANK picks the task's GPU


def test_launch_gpus_per_node_gives_one_task_per_gpu(tmp_path):
    _require_fake_gpus()
    r = _launch(tmp_path, "--gpus-per-node", "2", "--wait", "--wait-timeout", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 node(s) x 2 task(s)" in r.stdout
    recs = _records(tmp_path / "run")
    assert [x["RANK"] for x in recs] == ["0", "1", "2", "3"] and {x["WORLD_SIZE"] for x in recs} == {"4"}
    assert {(x["SLURMD_NODENAME"], x["LOCAL_RANK"]) for x in recs} == {("n1", "0"), ("n1", "1"), ("n2", "0"),
                                                                       ("n2", "1")}
    assert {x["CUDA_VISIBLE_DEVICES"] for x in recs} == {"0,1"}


def _probe_job(tmp_path: Path, run: Path, opts: list[str] = SMALL, ready: str | None = "-restart0.started",
               **probe: str) -> str:
    """sbatch slurm/train.sh with the probe trainer on 2 nodes; returns the job id once both ranks wrote
    probe-rank{r}{ready} (at once with ready=None). The job's log is tmp_path/vdm-train-<job>.out."""
    job = sbatch([*opts, f"--output={tmp_path}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  "--set", f"run.out_dir={run}"], env=probe_env(**probe))
    if ready is not None:
        _wait_ranks_ready(run, job, ready)
    return job


def _wait_ranks_ready(run: Path, job: str, ready: str = "-restart0.started") -> None:
    for rank in (0, 1):
        wait_file(run / f"probe-rank{rank}{ready}", 60, job)


def test_train_sh_usr1_saves_requeues_and_restarts(tmp_path):
    """USR1 reaches the python tasks; exit 75 -> scontrol requeue -> same job restarts (restart 1)."""
    run = tmp_path / "run"
    job = _probe_job(tmp_path, run, PROBE_SECONDS="60")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    wait_file(run / "probe-rank0-restart1.json", 90, job)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "COMPLETED"
    first, second = _records(run, 0), _records(run, 1)
    assert [r["signals"] for r in first] == [["USR1"], ["USR1"]]
    assert [r["SLURM_RESTART_COUNT"] for r in second] == ["1", "1"] and all(r["SLURM_JOB_ID"] == job for r in second)
    log = (tmp_path / f"vdm-train-{job}.out").read_text()  # appended across the restart, not replaced
    assert "requeueing job" in log and "restart 0:" in log and "restart 1:" in log


def test_train_sh_usr1_to_batch_shell_is_forwarded(tmp_path):
    """With --signal=B:USR1@.. only the batch script gets the signal; it must forward it to srun's tasks."""
    run = tmp_path / "run"
    job = _probe_job(tmp_path, run, PROBE_SECONDS="60")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    wait_file(run / "probe-rank1-restart1.json", 90, job)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "COMPLETED"
    assert "received SIGUSR1, forwarding" in (tmp_path / f"vdm-train-{job}.out").read_text()


def test_train_sh_usr1_during_trainer_start_up_still_requeues(tmp_path):
    """A signal before the trainer has its handler kills it (128+USR1); the job must still come back."""
    run = tmp_path / "run"
    job = _probe_job(tmp_path, run, ready=".booting", PROBE_STARTUP_S="60")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    wait_file(run / "probe-rank1-restart1.json", 90, job)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "COMPLETED"
    assert not list(run.glob("probe-rank*-restart0.json"))  # the first start never got to run
    assert "died from SIGUSR1 during start-up" in (tmp_path / f"vdm-train-{job}.out").read_text()


@pytest.mark.slow
def test_train_sh_time_limit_warning_requeues(tmp_path):
    """SLURM's own pre-time-limit signal (--time=3 --signal=USR1@100) -> save, requeue, finish."""
    run = tmp_path / "run"
    opts = [o for o in SMALL if not o.startswith("--time")] + ["--time=3", "--signal=USR1@100"]
    job = _probe_job(tmp_path, run, opts=opts, ready=None, PROBE_SECONDS="170")
    wait_file(run / "probe-rank0-restart1.json", 170, job)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 60) == "COMPLETED"
    first = _records(run, 0)
    assert len(first) == 2 and all(r["signals"] == ["USR1"] for r in first), first


def test_train_sh_cancel_saves_but_is_not_requeued(tmp_path):
    run = tmp_path / "run"
    job = _probe_job(tmp_path, run, PROBE_SECONDS="60")
    subprocess.run(["scancel", job], check=True, timeout=30)
    assert wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, 60) == "CANCELLED"
    wait_file(run / "probe-rank0-restart0.json", 30)
    assert _records(run)[0]["signals"] == ["TERM"]  # the trainer was told to save
    # a requeue could only come from train.sh (scontrol requeue) while its batch step runs: once that
    # step has ended, the job is settled
    assert wait_batch_step_ended(job, 120) == "CANCELLED"
    assert not list(run.glob("probe-rank*-restart1.*"))
    assert "requeueing job" not in (tmp_path / f"vdm-train-{job}.out").read_text()


# The preemption tests hold the probe in step PROBE_HOLD (PROBE_HOLD_AT_STEP, tests/slurm_probe.py) until
# SLURM's signal lands, so the save is exactly PROBE_HOLD + 1 with steps left however long the preemption
# takes to arrive (a fixed step budget, 1000 steps of 0.05 s, raced it); the restart does the rest at once.
PROBE_HOLD, PROBE_STEPS = 3, 8


def _held_probe() -> dict[str, str]:
    return {"PROBE_STEPS": str(PROBE_STEPS), "PROBE_STEP_S": "0.05", "PROBE_HOLD_AT_STEP": str(PROBE_HOLD)}


def _steps(run: Path, rank: int) -> list[tuple[int, int]]:
    """(step, restart) of every step the probe of this rank finished, in order."""
    return [tuple(map(int, line.split())) for line in (run / f"probe-rank{rank}-steps.txt").read_text().splitlines()]


def _resumed_once_where_it_saved(run: Path, job: str, steps: int, log: str) -> list[str]:
    """A preempted 2-rank probe job: both ranks were told to save by SIGTERM, saved after their held
    step and resumed there in the one restart of the same job id, every step done exactly once. Returns the
    states sacct gives the job's two attempts (the first one's says who requeued it)."""
    first, second = _records(run, 0), _records(run, 1)
    assert [set(r["signals"]) for r in first] == [{"TERM"}, {"TERM"}], log  # told to save, by SIGTERM
    for rank, (a, b) in enumerate(zip(first, second)):
        saved = a["step"]
        assert saved == PROBE_HOLD + 1 < steps and b["resumed_at"] == saved  # resumed where it saved
        # every step exactly once across the preemption: the first attempt's up to the save, then the rest
        assert _steps(run, rank) == [(s, 0) for s in range(saved)] + [(s, 1) for s in range(saved, steps)]
    assert [r["SLURM_RESTART_COUNT"] for r in second] == ["1", "1"] and {r["SLURM_JOB_ID"] for r in second} == {job}
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    assert "Restarts=1" in show, show
    return subprocess.run(["sacct", "-n", "-D", "-X", "-P", "-j", job, "-o", "State"], capture_output=True,
                          text=True, timeout=30).stdout.split()


@pytest.mark.parametrize("grace_s", [0, 30])
def test_train_sh_preempted_job_is_requeued_and_resumes(tmp_path, grace_s):
    """A job in the higher-tier partition `urgent` needs n1: SLURM preempts the `debug` job
    (PreemptMode=REQUEUE), SIGTERM makes the trainer save at its step, the job is requeued and, once the
    urgent job is done, the same job id resumes at that step. Who requeues depends on debug's GraceTime:
    0 (the default): SLURM signals the batch script too (SIGTERM, SIGKILL after KillWait) and requeues
    the job itself; train.sh must not. >0: only the tasks get SIGTERM, at once; the batch script is not
    signalled, so train.sh sees a saved trainer (exit 75) and requeues the job (SLURM would only once
    the grace time ran out). GraceTime only acts on preempted jobs, which only these tests make."""
    require_partition("urgent")
    before = grace_time("debug")
    set_grace_time("debug", grace_s)
    run, steps = tmp_path / "run", PROBE_STEPS
    job = urgent = ""
    try:
        # --exclusive: the urgent job then preempts this job and no other one on the shared cluster
        job = _probe_job(tmp_path, run, [*SMALL, "--exclusive"], ready=".held", **_held_probe())
        urgent = sbatch(["-p", "urgent", "-w", "n1", "--exclusive", "--time=1", f"--output={tmp_path}/urgent-%j.out",
                         "--wrap", "sleep 3"])
        # not wait_file(..., job): sacct reports the preempted attempt PREEMPTED until it runs again
        for rank in (0, 1):
            wait_file(run / f"probe-rank{rank}-restart1.json", 120)
        assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "COMPLETED"
        assert wait_state(urgent, {"COMPLETED", "FAILED", "CANCELLED"}, 30) == "COMPLETED"
    finally:
        set_grace_time("debug", before)
        if job:
            subprocess.run(["scancel", job, *([urgent] if urgent else [])], capture_output=True, timeout=30)
    log = (tmp_path / f"vdm-train-{job}.out").read_text()
    attempts = _resumed_once_where_it_saved(run, job, steps, log)
    assert "restart 0:" in log and "restart 1:" in log
    if grace_s == 0:
        assert attempts == ["PREEMPTED", "COMPLETED"], attempts
        # srun, signalled too, exits 75 (then train.sh says "not requeueing it here") or 143 (a race)
        assert "received SIGTERM, forwarding" in log and "requeueing job" not in log, log
    else:
        assert attempts == ["REQUEUED", "COMPLETED"], attempts  # as after `scontrol requeue`
        assert "received SIGTERM" not in log and f"requeueing job {job} (restart 1)" in log, log


def test_train_sh_crash_fails_the_job(tmp_path):
    run = tmp_path / "run"
    job = sbatch([*SMALL, f"--output={tmp_path}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  "--set", f"run.out_dir={run}"], env=probe_env(PROBE_EXIT="3"))
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 90) == "FAILED"
    exit_code = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "ExitCode"], capture_output=True,
                               text=True).stdout.split()[0]
    assert exit_code == "3:0"
    assert "training tasks exited with code 3" in (tmp_path / f"vdm-train-{job}.out").read_text()


def test_train_sh_one_crashed_rank_does_not_leave_the_job_hanging(tmp_path):
    """Rank 1 dies, rank 0 would run for 5 minutes: srun --wait ends the job (and rank 0) soon after the
    crash instead of leaving it to run out its time."""
    run = tmp_path / "run"
    job = sbatch([*SMALL, f"--output={tmp_path}/%x-%j.out", "slurm/train.sh", "configs/demo.yaml",
                  "--set", f"run.out_dir={run}"],
                 env=probe_env(PROBE_SECONDS="300", PROBE_CRASH_RANK="1", VDM_SRUN_WAIT="5"))
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 240) == "FAILED"
    log = (tmp_path / f"vdm-train-{job}.out").read_text()
    assert "PROBE rank 1 crashing" in log and "requeueing" not in log
    assert "PROBE done" not in log  # rank 0 was stopped, not left to finish its 300 s


def _launch(tmp_path, *extra, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "slurm.launch", "--config", "configs/demo.yaml",
                           "--set", f"run.out_dir={tmp_path / 'run'}", "--nodes", "2", "--cpus-per-task", "1",
                           "--time", "5", *extra], cwd=REPO, env=env or probe_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_launch_two_nodes_returns_results(tmp_path):
    r = _launch(tmp_path, "--wait", "--wait-timeout", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted job" in r.stdout and "tensorboard --logdir" in r.stdout and "_0_log.out" in r.stdout
    assert "COMPLETED" in r.stdout
    recs = _records(tmp_path / "run")
    assert [r["RANK"] for r in recs] == ["0", "1"] and {r["WORLD_SIZE"] for r in recs} == {"2"}
    assert {r["MASTER_ADDR"] for r in recs} == {"n1"} and {r["SLURMD_NODENAME"] for r in recs} == {"n1", "n2"}


def test_launch_crash_is_reported_failed_with_log_path(tmp_path):
    r = _launch(tmp_path, "--wait", "--wait-timeout", "120", env=probe_env(PROBE_EXIT="3"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stderr and "failed with exit code 3" in r.stderr
    log_line = next(line for line in r.stderr.splitlines() if line.strip().startswith("log:"))
    log_path = log_line.split("log:", 1)[1].strip()
    assert log_path.startswith(str(tmp_path / "run" / "slurm")) and "PROBE done, exit 3" in open(log_path).read()


def test_launch_node_range_starts_on_the_nodes_there_are(tmp_path):
    """`--nodes 2-3` on the 2-node cluster: the job starts on the 2 nodes there are instead of pending
    for a third, every task's rendezvous describes that allocation (world size = the nodes SLURM
    allocated, one master, one port), and `--wait` reports the job COMPLETED. (SLURM gives a range
    with idle nodes its minimum, so this is how a range beyond the minimum is seen here.)"""
    r = _launch(tmp_path, "--nodes", "2-3", "--wait", "--wait-timeout", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "COMPLETED" in r.stdout, r.stdout + r.stderr
    job = r.stdout.split("submitted job ", 1)[1].split()[0]
    allocated = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "NNodes"], capture_output=True,
                               text=True, timeout=30).stdout.split()[0]
    recs = _records(tmp_path / "run")
    assert allocated == "2" and [x["RANK"] for x in recs] == ["0", "1"], (allocated, recs)
    assert {x["WORLD_SIZE"] for x in recs} == {allocated} and {x["SLURM_JOB_ID"] for x in recs} == {job}
    assert {x["MASTER_ADDR"] for x in recs} == {"n1"} and {x["SLURMD_NODENAME"] for x in recs} == {"n1", "n2"}
    assert len({x["MASTER_PORT"] for x in recs}) == 1


def test_launch_one_crashed_rank_fails_the_job_and_stops_the_others(tmp_path):
    """Rank 1 dies at start, rank 0 would run for 5 minutes: srun --wait (VDM_SRUN_WAIT, as for
    train.sh) stops rank 0 soon after the crash, `--wait` reports the job FAILED and exits 1 well
    before its own timeout, and nothing is requeued."""
    r = _launch(tmp_path, "--wait", "--wait-timeout", "200",
                env=probe_env(PROBE_SECONDS="300", PROBE_CRASH_RANK="1", VDM_SRUN_WAIT="5"), timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stderr and "not cancelled" not in r.stderr, r.stderr
    run = tmp_path / "run"
    assert (run / "probe-rank1-restart0.started").exists() and not list(run.glob("probe-rank*-restart1.*"))
    assert not (run / "probe-rank0-restart0.json").exists()  # rank 0 was stopped, not left to finish its 300 s


def _pids(module: str, arg: str) -> list[int]:
    """Pids of this host's `python -m <module> ... <arg> ...` processes (not the srun that starts them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not a process, or gone
            continue
        if module in argv and any(arg in a for a in argv) and not Path(argv[0]).name.startswith("srun"):
            pids.append(int(proc.name))
    return pids


def test_launch_wait_reports_a_job_killed_without_a_result(tmp_path):
    """Its submitit tasks SIGKILLed, a job leaves no result (as after a node failure): `--wait` must
    learn from SLURM that the job is over and exit 1 naming it, not wait for ever. (`scancel
    --signal=KILL` would not do: SLURM turns it into a plain cancel, SIGTERM first, and the task then
    reports the trainer's exit as an error. Two nodes: submitit alone asks SLURM about a multi-task
    job only at growing intervals, up to 10 minutes; tests/test_slurm_unit.py checks we do not wait.)"""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "slurm.launch", "--config", "configs/demo.yaml", "--set", f"run.out_dir={run}",
           "--nodes", "2", "--cpus-per-task", "1", "--time", "5", "--wait", "--wait-timeout", "120"]
    p = subprocess.Popen(cmd, cwd=REPO, env=probe_env(PROBE_SECONDS="120"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    job = ""
    try:
        first = p.stdout.readline()  # "submitted job <id> (...)", flushed before the wait
        assert first.startswith("submitted job "), first + p.stderr.read()
        job = first.split()[2]
        _wait_ranks_ready(run, job)
        # every node of the local cluster is this host: kill each node's submitit task, then its
        # orphaned trainer, as a node failure would (the job's step no longer owns the orphans)
        tasks = _pids("submitit.core._submit", str(run / "slurm" / "%j"))  # the folder as submitted
        assert len(tasks) == 2, tasks
        for pid in tasks + _pids("slurm_probe", f"run.out_dir={run}"):
            os.kill(pid, signal.SIGKILL)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
        if job:
            subprocess.run(["scancel", job], capture_output=True, timeout=30)
    assert p.returncode == 1, first + out + err
    assert f"job {job} FAILED" in err and "died without a result" in err, err
    assert f"Job {job} (task: " in err and "has not produced any output" in err, err
    assert not list(run.glob("probe-rank*-restart0.json"))  # the probes were killed, not finished


def _submit_probe(tmp_path, **env):
    """Submit through the library (as slurm.launch does) so the test holds the submitit Job."""
    from common.submitit_executor import make_executor
    from slurm.launch import TrainTask

    old = dict(os.environ)
    os.environ.update(probe_env(**env))
    try:
        ex = make_executor(tmp_path / "run" / "slurm" / "%j", nodes=2, tasks_per_node=1, cpus_per_task=1,
                           time_min=5)
        task = TrainTask(str(REPO / "configs/demo.yaml"), [f"run.out_dir={tmp_path / 'run'}"], str(REPO))
        return ex.submit(task)
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_launch_usr1_saves_requeues_and_finishes(tmp_path):
    """USR1 by hand requeues a submitit job too (submitit's own USR2 -> checkpoint() path is tested
    with the real trainer in test_slurm_training.py)."""
    from slurm.launch import wait_for

    run = tmp_path / "run"
    job = _submit_probe(tmp_path, PROBE_SECONDS="60")
    _wait_ranks_ready(run, job.job_id)
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True, timeout=30)
    ok, results = wait_for(job, 120)
    assert ok, results
    assert [r["restarts"] for r in results] == [1, 1] and [r["rank"] for r in results] == [0, 1]
    first = _records(run, 0)
    # every rank's trainer was asked to save (directly by SLURM and/or forwarded by its submitit task)
    assert len(first) == 2 and all(set(r["signals"]) == {"USR1"} for r in first), first
    assert len(_records(run, 1)) == 2


def test_launch_dry_run_matches_what_submitit_submits(tmp_path):
    """--dry-run renders the script without SLURM; it must equal the real executor's script."""
    from common.submitit_executor import make_executor
    from slurm.launch import render_sbatch

    folder = str(tmp_path / "%j")
    kw = dict(nodes=2, tasks_per_node=1, gpus_per_node=0, cpus_per_task=1, partition="debug", time_min=7,
              job_name="x", extra_sbatch=["qos=normal"])
    ex = make_executor(folder, **kw)
    real = ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "uid")
    assert render_sbatch(folder, **kw) == real


def test_launch_usr1_during_trainer_start_up_still_requeues(tmp_path):
    from slurm.launch import wait_for

    run = tmp_path / "run"
    job = _submit_probe(tmp_path, PROBE_STARTUP_S="60")
    _wait_ranks_ready(run, job.job_id, ".booting")
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True, timeout=30)
    ok, results = wait_for(job, 120)
    assert ok, results
    assert [r["restarts"] for r in results] == [1, 1]


@pytest.mark.parametrize("grace_s", [0, 30])
def test_launch_preempted_job_is_requeued_and_resumes(tmp_path, grace_s):
    """As test_train_sh_preempted_job_is_requeued_and_resumes, through `slurm.launch --wait`: the
    submitit tasks ask SLURM why they got SIGTERM. GraceTime=0: SLURM has requeued the job already
    (Restarts went up); GraceTime>0: the job is still RUNNING with PreemptTime set, and rank 0 requeues
    it (SLURM would let it end in its grace time). Either way the trainer saves, no task leaves a
    result for the preempted attempt, and `--wait` waits through it and reports the job COMPLETED."""
    require_partition("urgent")
    before = grace_time("debug")
    set_grace_time("debug", grace_s)
    run, steps = tmp_path / "run", PROBE_STEPS
    cmd = [sys.executable, "-m", "slurm.launch", "--config", "configs/demo.yaml", "--set", f"run.out_dir={run}",
           "--nodes", "2", "--cpus-per-task", "1", "--time", "5", "--sbatch", "exclusive", "--wait",
           "--wait-timeout", "240"]
    p = subprocess.Popen(cmd, cwd=REPO, env=probe_env(**_held_probe()),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = urgent = first = ""
    try:
        first = p.stdout.readline()  # "submitted job <id> (...)", flushed before the wait
        assert first.startswith("submitted job "), first + p.stderr.read()
        job = first.split()[2]
        _wait_ranks_ready(run, job, ".held")  # both ranks wait in step PROBE_HOLD for the preemption
        urgent = sbatch(["-p", "urgent", "-w", "n1", "--exclusive", "--time=1", f"--output={tmp_path}/urgent-%j.out",
                         "--wrap", "sleep 3"])
        out, err = p.communicate(timeout=270)
        assert wait_state(urgent, {"COMPLETED", "FAILED", "CANCELLED"}, 30) == "COMPLETED"
    finally:
        set_grace_time("debug", before)
        if p.poll() is None:
            p.kill()
        if job:
            subprocess.run(["scancel", job, *([urgent] if urgent else [])], capture_output=True, timeout=30)
    logs = "\n".join(f.read_text() for f in sorted((run / "slurm" / job).glob("*_log.out")))
    assert p.returncode == 0, first + out + err + logs
    assert f"job {job} COMPLETED" in out and out.count("'restarts': 1") == 2, out  # both ranks' results
    attempts = _resumed_once_where_it_saved(run, job, steps, logs)
    # every task told the preemption from a cancel, and no task reported the first attempt as an error
    assert "stopped by SIGTERM" not in logs and "a cancel" not in logs, logs
    if grace_s == 0:  # SLURM had requeued the job when the tasks asked; it must not be requeued twice
        assert attempts == ["PREEMPTED", "COMPLETED"], attempts
        assert logs.count(f"SIGTERM for job {job} (JobState=COMPLETING Restarts=1 ") == 2, logs
        assert "was requeued by SLURM, not requeueing it again" in logs and "requeueing job" not in logs, logs
    else:  # preempted in its grace time: rank 0 requeues (`scontrol requeue`: the attempt is REQUEUED)
        assert attempts == ["REQUEUED", "COMPLETED"], attempts
        # rank 0 saw the grace time; rank 1 too, unless it asked after rank 0's requeue (then it saw
        # the job requeued, as with GraceTime=0): either way it only waits to be stopped
        assert logs.count(f"SIGTERM for job {job} (") == 2, logs
        assert re.search(rf"\[rank 0\] [\d:]+ INFO slurm.launch: SIGTERM for job {job} \(JobState=RUNNING "
                         r"Restarts=0 PreemptTime=20", logs), logs
        assert logs.count(f"requeueing job {job}") == 1, logs


def test_launch_cancel_saves_but_is_not_requeued(tmp_path):
    """scancel: the tasks learn from SLURM that their SIGTERM is no preemption (PreemptTime=None), the
    trainer saves, and the job ends CANCELLED, reported as stopped by SIGTERM; nothing requeues it."""
    from slurm.launch import wait_for

    run = tmp_path / "run"
    job = _submit_probe(tmp_path, PROBE_SECONDS="60")
    _wait_ranks_ready(run, job.job_id)
    subprocess.run(["scancel", job.job_id], check=True, timeout=30)
    ok, why = wait_for(job, 120)
    assert not ok and "stopped by SIGTERM after saving a checkpoint" in why, why
    # every trainer was told to save (directly by SLURM and/or forwarded by its submitit task)
    assert [set(r["signals"]) for r in _records(run)] == [{"TERM"}, {"TERM"}]
    # a requeue could only come from a task (scontrol requeue) while the job's steps run
    assert wait_batch_step_ended(job.job_id, 120) == "CANCELLED"
    assert not list(run.glob("probe-rank*-restart1.*"))
    logs = "\n".join(f.read_text() for f in sorted((run / "slurm" / job.job_id).glob("*_log.out")))
    assert logs.count(f"SIGTERM for job {job.job_id} (JobState=") == 2, logs  # both tasks asked SLURM
    assert logs.count("PreemptTime=None): a cancel;") == 2 and "requeueing" not in logs, logs


def test_train_sh_stops_requeueing_at_the_limit(tmp_path):
    run = tmp_path / "run"
    job = _probe_job(tmp_path, run, PROBE_SECONDS="60", VDM_MAX_REQUEUES="0")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "FAILED"  # exit 75, not requeued
    assert "reached VDM_MAX_REQUEUES" in (tmp_path / f"vdm-train-{job}.out").read_text()
    assert not list(run.glob("probe-rank*-restart1.*"))


def test_local_cluster_up_is_idempotent_and_status_reports(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("local_cluster.sh needs root")
    before = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True).stdout.split()
    up = subprocess.run(["slurm/local_cluster.sh", "up"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "already running" in up.stdout or "not started by this script" in up.stdout
    after = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True).stdout.split()
    assert before == after  # nothing restarted
    st = subprocess.run(["slurm/local_cluster.sh", "status"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and "n1" in st.stdout and "n2" in st.stdout
