"""SLURM helpers that need no cluster: host lists, ports, rank mapping, the dry-run script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from slurm_helpers import REPO, probe_env

from common.submitit_executor import _extra_params, make_executor
from slurm import env as slurm_env


def test_expand_nodelist_matches_slurm_syntax():
    assert slurm_env.expand_nodelist("n[1-2]") == ["n1", "n2"]
    assert slurm_env.expand_nodelist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]
    assert slurm_env.expand_nodelist("node5") == ["node5"]


def test_dist_env_maps_slurm_variables_and_derives_rendezvous():
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
           "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456", "SLURM_TASKS_PER_NODE": "8(x2)",
           "MASTER_ADDR": "stale-host", "MASTER_PORT": "1"}
    d = slurm_env.dist_env(env)
    assert d["RANK"] == "9" and d["LOCAL_RANK"] == "1" and d["WORLD_SIZE"] == "16"
    assert d["LOCAL_WORLD_SIZE"] == "8"
    # inside a job the rendezvous always comes from the job, not from a stale exported value
    assert d["MASTER_ADDR"] == "gpu07"
    assert d["MASTER_PORT"] == str(29500 + 123456 % 2000)


def test_dist_env_unset_means_single_process():
    d = slurm_env.dist_env({})
    assert (d["RANK"], d["WORLD_SIZE"], d["LOCAL_RANK"], d["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")


def test_master_port_differs_between_neighbouring_jobs_and_stays_in_range():
    ports = {slurm_env.master_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(29500 <= p < 31500 for p in ports)


def test_extra_sbatch_options_always_requeue():
    assert _extra_params(None) == {"requeue": True}
    assert _extra_params(["qos=high", "--exclusive"]) == {"requeue": True, "qos": "high", "exclusive": True}
    assert _extra_params({"mail_type": "END"})["mail-type"] == "END"
    with pytest.raises(ValueError, match="key=value"):
        _extra_params(["=x"])


def test_make_executor_rejects_bad_sizes_and_runs_locally(tmp_path):
    with pytest.raises(ValueError, match="nodes=0"):
        make_executor(tmp_path, nodes=0, cluster="local")
    ex = make_executor(tmp_path / "%j", cluster="local", cpus_per_task=1, time_min=5)
    assert ex.submit(sum, [1, 2, 3]).result() == 6


def test_dry_run_prints_the_sbatch_script_without_submitting(tmp_path):
    out_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "slurm.launch", "--config", "configs/demo.yaml",
                        "--set", f"run.out_dir={out_dir}", "--nodes", "4", "--gpus-per-node", "8",
                        "--cpus-per-task", "12", "--partition", "gpu", "--time", "2880",
                        "--sbatch", "qos=high", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    s = r.stdout
    for flag in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=12",
                 "--partition=gpu", "--time=2880", "--signal=USR2@120", "--requeue", "--qos=high",
                 f"--output={out_dir}/slurm/%j/%j_0_log.out"):
        assert f"#SBATCH {flag}\n" in s, (flag, s)
    assert "srun --unbuffered" in s and "--wait=120" in s and "submitit.core._submit" in s
    assert f"-m trainer.train --config {REPO}/configs/demo.yaml --set run.out_dir={out_dir}" in s
    assert not (out_dir / "slurm").exists()  # nothing submitted, nothing written


def test_a_node_range_reaches_sbatch_while_submitit_counts_the_minimum(tmp_path):
    from common.submitit_executor import node_params, parse_nodes

    assert parse_nodes(4) == parse_nodes("4") == (4, 4) and parse_nodes("1-2") == (1, 2)
    assert node_params("2") == (2, {}) and node_params("1-3") == (1, {"nodes": "1-3"})
    for bad in ("0", "2-1", "x", "1-"):
        with pytest.raises(ValueError, match="nodes="):
            parse_nodes(bad)
    r = subprocess.run([sys.executable, "-m", "slurm.launch", "--config", "configs/demo.yaml",
                        "--set", f"run.out_dir={tmp_path / 'run'}", "--nodes", "1-2", "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("#SBATCH --nodes=") == 1 and "#SBATCH --nodes=1-2\n" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "slurm.launch", "--config", "configs/demo.yaml", "--nodes", "2-1",
                          "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--nodes" in bad.stderr and "MIN <= MAX" in bad.stderr


def test_launch_rejects_a_bad_config_before_submitting(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slurm.launch", "--config", "configs/demo.yaml",
                        "--set", "run.stepz=3", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "run.stepz" in r.stderr


def test_train_sh_outside_slurm_runs_one_task_with_rank_zero(tmp_path):
    """The batch script also runs by hand (no SLURM variables): one task, WORLD_SIZE=1."""
    env = probe_env()
    for k in list(env):
        if k.startswith("SLURM_"):
            del env[k]
    r = subprocess.run(["bash", "slurm/train.sh", "configs/demo.yaml", "--set", f"run.out_dir={tmp_path}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((tmp_path / "probe-rank0-restart0.json").read_text())
    assert (rec["RANK"], rec["WORLD_SIZE"], rec["LOCAL_RANK"], rec["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")


def test_train_sh_rejects_a_bad_override_before_starting_tasks(tmp_path):
    r = subprocess.run(["bash", "slurm/train.sh", "configs/demo.yaml", "--set", "optim.lrr=1"], cwd=REPO,
                       env=probe_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "optim.lrr" in r.stdout + r.stderr


def test_probe_holds_its_step_until_signalled_then_saves_the_next_and_resumes_there(tmp_path):
    """tests/slurm_probe.py's PROBE_HOLD_AT_STEP, which the preemption tests in test_slurm_cluster.py
    rely on instead of racing a step budget: the held step waits for the signal however late it
    comes (here 1 s after the marker, 20 steps' worth), the save is exactly that step + 1, and the
    restart does every later step once without holding again."""
    import os
    import signal
    import time

    from slurm_helpers import wait_file

    out, steps, hold = tmp_path / "run", 8, 3
    cmd = [sys.executable, "tests/slurm_probe.py", "--config", "configs/demo.yaml", "--set", f"run.out_dir={out}"]
    env = probe_env(RANK="0", PROBE_STEPS=str(steps), PROBE_STEP_S="0.05", PROBE_HOLD_AT_STEP=str(hold))
    env.pop("SLURM_RESTART_COUNT", None)
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_file(out / "probe-rank0.held", 60)
        time.sleep(1.0)
        assert first.poll() is None, "the held step did not wait for the signal"
        os.kill(first.pid, signal.SIGTERM)
        output, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 75, output
    assert (out / "probe-rank0.ckpt").read_text() == str(hold + 1)
    again = subprocess.run(cmd, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    done = [tuple(map(int, line.split())) for line in (out / "probe-rank0-steps.txt").read_text().splitlines()]
    assert done == [(s, 0) for s in range(hold + 1)] + [(s, 1) for s in range(hold + 1, steps)]


class _FakeWatcher:
    def __init__(self):
        self.modes: list[str] = []

    def get_state(self, job_id: str, mode: str = "standard") -> str:
        self.modes.append(mode)
        return "UNKNOWN"


class _FakeJob:
    """A submitit Job whose SLURM state says finished: `results()` raises what submitit raises then."""

    def __init__(self, done: bool, error: Exception | None = None):
        self._done, self._error, self.job_id, self.watcher = done, error, "7", _FakeWatcher()
        self.state = "NODE_FAIL" if done else "RUNNING"

    def done(self, force_check: bool = False) -> bool:
        return self._done

    def results(self):
        if self._error is not None:
            raise self._error
        return [{"rank": 0}]


@pytest.fixture
def fake_slurm_bin(tmp_path, monkeypatch):
    """A folder first on PATH; fake_slurm_bin(name, script) puts an executable `name` there."""
    import os

    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def add(name: str, script: str) -> None:
        (bin_dir / name).write_text("#!/bin/sh\n" + script)
        (bin_dir / name).chmod(0o755)

    return add


def test_launch_wait_notices_a_job_that_died_without_a_result(fake_slurm_bin):
    """slurm.launch --wait: a job killed before it wrote a result (node failure, kill -9, OOM) is
    reported as died without a result with submitit's reason, after asking SLURM (a forced check, which
    submitit's done(force_check=True) does not pass on to the tasks of a multi-task job), not waited on
    for ever. On the real cluster: test_slurm_cluster.py::test_launch_wait_reports_a_job_killed_without_a_result."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from slurm.launch import wait_for

    fake_slurm_bin("squeue", "exit 1\n")  # the controller no longer knows job 7
    died = _FakeJob(True, UncompletedJobError("Job 7 (task: 0) has not produced any output (state: NODE_FAIL)"))
    ok, why = wait_for(died, 60)
    assert not ok and why.startswith("died without a result: UncompletedJobError:"), why
    assert "has not produced any output" in why
    assert died.watcher.modes == ["force"]  # the SLURM state was polled, not only the result file
    crashed = FailedJobError("Job (task=0) failed during processing with trace: ... exit code 3")
    ok, why = wait_for(_FakeJob(True, crashed), 60)  # a crash is reported as such (its result says why)
    assert not ok and why.startswith("FailedJobError: Job (task=0) failed") and "without a result" not in why
    assert wait_for(_FakeJob(True), 60) == (True, [{"rank": 0}])
    ok, why = wait_for(_FakeJob(False), 0)
    assert not ok and why == "still RUNNING after 0 s (not cancelled)"


def test_launch_wait_asks_slurm_about_every_task_of_a_multi_task_job(tmp_path, monkeypatch, fake_slurm_bin):
    """A real submitit Job of 2 tasks, an hour after its submission, its state last read a second ago:
    submitit's tasks would ask sacct again only 10 minutes later (done(force_check=True) does not reach
    them), so a job that died in between went unnoticed that long. wait_for must ask SLURM at once."""
    import time

    import submitit
    from submitit.slurm.slurm import SlurmInfoWatcher

    from slurm.launch import wait_for

    calls = tmp_path / "sacct-calls"
    # what SLURM answers for a 2-node job whose nodes failed
    fake_slurm_bin("sacct", f'echo "$@" >> {calls}\nprintf "JobID|State|NodeList\\n7|NODE_FAIL|n[1-2]\\n"\n')
    fake_slurm_bin("squeue", "echo NODE_FAIL\n")  # not requeued
    watcher = SlurmInfoWatcher(delay_s=600)
    monkeypatch.setattr(submitit.SlurmJob, "watcher", watcher)
    monkeypatch.setattr(submitit.SlurmJob, "_results_timeout_s", 0)  # no result file will come
    (tmp_path / "7").mkdir()
    job = submitit.SlurmJob(folder=tmp_path / "%j", job_id="7", tasks=(0, 1))
    watcher._start_time, watcher._last_status_check = time.time() - 3600, time.time() - 1
    ok, why = wait_for(job, 3)
    assert not ok and why.startswith("died without a result: UncompletedJobError: Job 7 (task: 0)"), why
    assert "(state: NODE_FAIL)" in why and calls.read_text().count("-j 7") == 1


# `scontrol show job -o` of one job as SLURM 22.05 prints it, fields abridged, in the four cases
# measured on the local cluster right after the tasks' SIGTERM. A requeue resets PreemptTime, and
# then scontrol leaves out PreemptEligibleTime and PreemptTime altogether.
_SHOW = ("JobId=41 JobName=vdm-train UserId=root(0) Priority=1 Nice=0 Account=(null) QOS=normal "
         "JobState={state} Reason=None Dependency=(null) Requeue=1 Restarts={restarts} BatchFlag=1 Reboot=0 "
         "ExitCode=0:0 RunTime=00:00:09 TimeLimit=00:05:00 TimeMin=N/A SubmitTime=2026-12-02T02:32:20 "
         "StartTime=2026-12-02T02:32:25 EndTime=2026-12-02T02:35:25 Deadline=N/A {preempt}SuspendTime=None "
         "Partition=debug NodeList=n1 Command=/tmp/a b.sh WorkDir=/work/x y")
_PREEMPT = "PreemptEligibleTime=2026-12-02T02:32:25 PreemptTime={} "
_CANCELLED = _SHOW.format(state="COMPLETING", restarts=0, preempt=_PREEMPT.format("None"))
_PREEMPTED_IN_GRACE = _SHOW.format(state="RUNNING", restarts=0, preempt=_PREEMPT.format("2026-12-02T02:33:19"))
_REQUEUED = _SHOW.format(state="COMPLETING", restarts=1, preempt="")  # GraceTime=0: SLURM requeued it
_RUNNING = _SHOW.format(state="RUNNING", restarts=0, preempt=_PREEMPT.format("None"))  # e.g. scancel -s TERM


def test_term_cause_tells_a_requeue_a_preemption_in_its_grace_time_and_a_cancel_apart():
    from slurm.launch import parse_job_fields, term_cause

    fields = parse_job_fields(_PREEMPTED_IN_GRACE)
    assert fields["PreemptEligibleTime"] == "2026-12-02T02:32:25" and fields["PreemptTime"] == "2026-12-02T02:33:19"
    assert fields["JobState"] == "RUNNING" and fields["Restarts"] == "0" and fields["Command"] == "/tmp/a"
    assert term_cause(fields, 0) == ("preempted", "JobState=RUNNING Restarts=0 PreemptTime=2026-12-02T02:33:19")
    assert term_cause(parse_job_fields(_REQUEUED), 0) == ("requeued", "JobState=COMPLETING Restarts=1 PreemptTime=-")
    assert term_cause(parse_job_fields(_CANCELLED), 0)[0] == "cancel"
    assert term_cause(parse_job_fields(_RUNNING), 0)[0] == "cancel"
    # a later attempt (SLURM_RESTART_COUNT=1) that is cancelled: its restart count is no requeue
    assert term_cause(parse_job_fields(_CANCELLED.replace("Restarts=0", "Restarts=1")), 1)[0] == "cancel"
    assert term_cause(parse_job_fields(_REQUEUED.replace("Restarts=1", "Restarts=2")), 1)[0] == "requeued"
    # cancelled in its grace time (or preempted with PreemptMode=CANCEL): not RUNNING, not requeued
    assert term_cause(parse_job_fields(_PREEMPTED_IN_GRACE.replace("RUNNING", "COMPLETING")), 0)[0] == "cancel"
    assert term_cause({}, 0) == ("cancel", "SLURM did not answer")  # the safe side: nothing requeues it


def test_job_fields_is_bounded_and_says_nothing_when_slurm_does_not_answer(fake_slurm_bin, caplog):
    """The task asks SLURM while KillWait runs: a hung or failing scontrol must not hold it up."""
    import time

    from slurm.launch import job_fields

    fake_slurm_bin("scontrol", "sleep 30\n")
    t0 = time.monotonic()
    assert job_fields("41", timeout_s=0.5) == {}
    assert time.monotonic() - t0 < 5 and "TimeoutExpired" in caplog.text
    fake_slurm_bin("scontrol", "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1\n")
    assert job_fields("41") == {} and "Invalid job id" in caplog.text
    fake_slurm_bin("scontrol", f"echo '{_REQUEUED}'\n")
    assert job_fields("41")["Restarts"] == "1"
    # the SIGTERM of a requeue that reaches every process of the step, scontrol too, while it answers
    fake_slurm_bin("scontrol", f"kill -TERM $$; echo '{_REQUEUED}'\n")
    assert job_fields("41")["Restarts"] == "1"


class _StatesWatcher(_FakeWatcher):
    def __init__(self, states):
        super().__init__()
        self.states = list(states)

    def get_state(self, job_id: str, mode: str = "standard") -> str:
        super().get_state(job_id, mode)
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def test_launch_wait_waits_through_a_requeued_attempt(fake_slurm_bin, tmp_path, monkeypatch):
    """Results (or sacct's PREEMPTED/NODE_FAIL) left by an attempt that SLURM requeued are not the
    job's end: wait_for asks the controller, waits while the job is pending or running again, and
    reports the last attempt's results."""
    import slurm.launch as launch

    states = tmp_path / "states"  # what the controller says, one answer per call
    states.write_text("COMPLETING\nPENDING\nRUNNING\nCOMPLETED\n")
    fake_slurm_bin("squeue", f'head -n1 {states}; sed -i 1d {states}\n')
    monkeypatch.setattr(launch.time, "sleep", lambda s: None)
    job = _FakeJob(True, RuntimeError("rank 1: an earlier attempt's error"))
    job.watcher = _StatesWatcher(["PREEMPTED"])

    def results():
        if states.read_text():  # the requeued attempt has not finished yet
            raise job._error
        return [{"rank": 0, "restarts": 1}]

    job.results = results
    assert launch.wait_for(job, 60) == (True, [{"rank": 0, "restarts": 1}])
    assert states.read_text() == ""  # asked until the controller said COMPLETED
