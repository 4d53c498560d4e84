"""Submit training to SLURM from Python (submitit), with save-and-requeue on preemption or timeout.

    python -m slurm.launch --config configs/vdm_t2v_small_16x64.yaml --set run.out_dir=runs/small \
        --nodes 4 --gpus-per-node 8 --cpus-per-task 12 --partition gpu --time 2880 [--wait] [--dry-run]

Why a subprocess per task instead of calling the trainer in-process: the trainer owns its signal
handling (finish the step, save, exit EXIT_REQUEUE), its process group and its CUDA context; submitit's
runner stays a thin supervisor that forwards signals, requeues and reports a crash with its log.

Signals: submitit asks SLURM for USR2 `signal_delay_s` before the time limit. Every task forwards
it to its trainer as USR1 (the trainer's "save and exit EXIT_REQUEUE"); on rank 0 submitit then calls
`TrainTask.checkpoint()`, which waits for that save and hands submitit a fresh `DelayedSubmission`,
and submitit runs `scontrol requeue`. A USR1 sent by hand (`scancel --signal=USR1 <job>`) takes the
same save + requeue path.

SIGTERM comes from a cancel (`scancel`) or from a preemption, which must end differently, so each
task asks SLURM which one it is (`scontrol show job`, bounded by a timeout; `term_cause()` says what
tells them apart) while its trainer saves (SIGTERM is forwarded). A cancel ends with an error and is
never requeued: a cancel stays a cancel. A preempted attempt ends without a result, and the job comes
back with the same id: with the preempted partition's GraceTime=0, SLURM has requeued the job before
the tasks hear of it (and signals the batch script too); with GraceTime>0 only the tasks are
signalled, the job runs on in its grace time and SLURM does not requeue a job that ends in it, so
rank 0 requeues it, as after USR1. `wait_for` (`--wait`) waits through the requeued attempt and
reports how the job finally ended. Measured on SLURM 22.05; tested in tests/test_slurm_cluster.py
(test_launch_preempted_job_is_requeued_and_resumes, test_launch_cancel_saves_but_is_not_requeued).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.helpers import Checkpointable, DelayedSubmission

from common.exit_codes import EXIT_REQUEUE  # the trainer's "requeue me" (dependency-free)
from common.logs import setup_logging
from common.submitit_executor import SIGNAL_DELAY_S, make_executor, node_params, slurm_available, srun_args
from slurm import env as slurm_env

TRAIN_MODULE_ENV = "VDM_TRAIN_MODULE"  # tests and debugging swap the trainer for a probe


log = logging.getLogger("slurm.launch")

# How long a task waits for `scontrol` when it must tell a preemption from a cancel. SLURM kills a
# preempted task KillWait (30 s by default) after its SIGTERM, and the trainer saves meanwhile.
SCONTROL_TIMEOUT_S = 10.0
_NOT_SET = ("", "None", "Unknown", "(null)")


def parse_job_fields(text: str) -> dict[str, str]:
    """`scontrol show job -o` output as {field: value}. Values that contain spaces (Command, Reason
    text, ...) come out cut at the first space; the fields read here (states, times) have none."""
    return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", text))


def job_fields(job_id: str, timeout_s: float = SCONTROL_TIMEOUT_S) -> dict[str, str]:
    """What the controller says about the job now (`scontrol show job -o`); {} when it does not answer
    within timeout_s, or at all (the reason is logged)."""
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                           timeout=timeout_s, preexec_fn=_ignore_term)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning(f"scontrol show job {job_id}: {type(e).__name__}: {e}")
        return {}
    if r.returncode != 0:
        log.warning(f"scontrol show job {job_id} exited {r.returncode}: {r.stderr.strip()}")
        return {}
    return parse_job_fields(r.stdout)


def term_cause(fields: dict[str, str], restart_count: int) -> tuple[str, str]:
    """Why this attempt of the job got SIGTERM, from `scontrol show job` right after it, and the
    evidence in words: "requeued", "preempted" or "cancel" (measured on SLURM 22.05):

    - "requeued": Restarts has gone past this attempt's SLURM_RESTART_COUNT: SLURM requeued the job
      and is stopping this attempt. A preemption with the partition's GraceTime=0 looks so (JobState
      COMPLETING; the requeue has already reset PreemptTime), as does the end of a grace time or an
      `scontrol requeue`. The job comes back by itself.
    - "preempted": PreemptTime is set and the job is still RUNNING: preempted with GraceTime>0, in
      its grace time. SLURM would requeue it only if it outlived that time, not if it ends in it.
    - "cancel": anything else (`scancel`: COMPLETING with PreemptTime=None; a SIGTERM sent by hand;
      a preemption that cancels instead of requeueing; no answer from SLURM, the safe side: the
      trainer has saved, and nothing requeues a job its user may have cancelled)."""
    if not fields:
        return "cancel", "SLURM did not answer"
    state, restarts, preempt = (fields.get(k, "") for k in ("JobState", "Restarts", "PreemptTime"))
    said = f"JobState={state or '?'} Restarts={restarts or '?'} PreemptTime={preempt or '-'}"
    if restarts.isdigit() and int(restarts) > restart_count:
        return "requeued", said
    if preempt not in _NOT_SET and state == "RUNNING":
        return "preempted", said
    return "cancel", said


def _restart_count() -> int:
    """This attempt's number: 0 on the first run of a job (SLURM_RESTART_COUNT unset), then 1, 2, ..."""
    value = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(value) if value.isdigit() else 0


def _ignore_term() -> None:  # runs in the child between fork and exec
    # SLURM signals every process of the step, and a requeue by another rank sends a second SIGTERM
    # while this task may be asking scontrol why it got the first: killed, scontrol's silence read as
    # a cancel (seen in CI). The timeout bounds it; SIGKILL still ends it with the step.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ignore_usr2() -> None:  # runs in the child between fork and exec
    # SLURM signals every process of the step; USR2 is submitit's, and its default action would
    # kill the trainer. The USR1 we forward is the trainer's own signal.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TrainTask(Checkpointable):
    """The callable submitit runs on every task: one trainer process with this task's ranks."""

    def __init__(self, config: str, sets: list[str], root: str, python: str | None = None,
                 module: str | None = None) -> None:
        self.config = config
        self.sets = list(sets)
        self.root = root
        self.python = python or sys.executable
        self.module = module or os.environ.get(TRAIN_MODULE_ENV, "trainer.train")
        self._child: subprocess.Popen | None = None
        # why the trainer was asked to stop: "SIGUSR1"/"SIGUSR2" (requeue), "SIGTERM" (not known yet
        # why), then SLURM's answer (term_cause): "requeued", "preempted" or "cancel"
        self._stop: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # the pickle submitit writes must not hold a process
        state = dict(self.__dict__)
        state["_child"], state["_stop"] = None, None
        return state

    def command(self) -> list[str]:
        cmd = [self.python, "-m", self.module, "--config", self.config]
        for s in self.sets:
            cmd += ["--set", s]
        return cmd

    # ------------------------------------------------------------------ signals
    def _forward(self, signum: int) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signum)

    def _install_handlers(self) -> None:
        submitit_usr2 = signal.getsignal(signal.SIGUSR2)

        def on_usr(signum: int, frame: Any) -> None:
            self._stop = signal.Signals(signum).name  # a requeue request wins over an earlier TERM
            log.info(f"received {signal.Signals(signum).name}: asking the trainer to save (SIGUSR1)")
            self._forward(signal.SIGUSR1)
            if signum == signal.SIGUSR2 and callable(submitit_usr2):
                submitit_usr2(signum, frame)  # rank 0: checkpoint() + requeue + exit; others: returns

        def on_term(signum: int, frame: Any) -> None:
            # the save starts at once; whether this is a cancel or a preemption is asked of SLURM from
            # the main loop (_classify_term), not from this handler, which a second SIGTERM can re-enter
            self._stop = self._stop or "SIGTERM"
            log.info("received SIGTERM: asking the trainer to save (SIGTERM)")
            self._forward(signal.SIGTERM)

        signal.signal(signal.SIGUSR1, on_usr)
        signal.signal(signal.SIGUSR2, on_usr)
        signal.signal(signal.SIGTERM, on_term)

    def _wait_child(self, timeout_s: float | None = None) -> int | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._child is not None and self._child.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                return None
            self._classify_term()  # while the trainer saves: SLURM's view is freshest right after the signal
            time.sleep(0.2)
        return None if self._child is None else self._child.returncode

    def _classify_term(self) -> None:
        """After a SIGTERM: ask SLURM whether the job is being requeued, preempted or cancelled."""
        job_id = os.environ.get("SLURM_JOB_ID")
        if self._stop != "SIGTERM" or not job_id:
            return
        self._stop, why = term_cause(job_fields(job_id), _restart_count())
        then = {"requeued": "SLURM has requeued the job; the trainer saves and this attempt ends without a result",
                "preempted": "preempted in its grace time; the trainer saves, then rank 0 requeues the job",
                "cancel": "a cancel; the trainer saves, the job is not requeued"}[self._stop]
        log.info(f"SIGTERM for job {job_id} ({why}): {then}")

    # ------------------------------------------------------------------ submitit entry points
    def __call__(self) -> dict[str, Any]:
        env = dict(os.environ)
        dist = slurm_env.dist_env(env)
        env.update(dist)
        setup_logging(rank=int(dist["RANK"]), stream=sys.stdout)  # submitit keeps each task's stdout
        env.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        env["PYTHONUNBUFFERED"] = "1"
        log.info(f"{slurm_env.describe(dist)} restart {_restart_count()}: "
                 + shlex.join(self.command()))
        self._install_handlers()
        t0 = time.time()
        self._child = subprocess.Popen(self.command(), cwd=self.root, env=env, preexec_fn=_ignore_usr2)
        rc = self._wait_child()
        self._classify_term()  # a SIGTERM that came as the trainer exited has not been asked about yet
        rank = int(dist["RANK"])
        log.info(f"rank {rank}: trainer exited with code {rc} after {time.time() - t0:.1f} s")
        if rc == -signal.SIGUSR1 or (rc == -signal.SIGTERM and self._stop in ("requeued", "preempted")):
            # the signal arrived while the trainer was starting, before its handler existed: nothing
            # new was saved, but the last checkpoint is intact, so requeue and resume from it.
            rc = EXIT_REQUEUE
        if rc == EXIT_REQUEUE:
            if self._stop in ("cancel", "SIGTERM"):  # "SIGTERM": outside SLURM, nobody to ask
                raise RuntimeError(f"rank {rank}: stopped by SIGTERM after saving a checkpoint; "
                                   "resubmit with the same run.out_dir to resume")
            if self._stop in ("requeued", "preempted"):
                self._end_preempted_attempt(rank)
            self._requeue_and_wait(rank)
        if rc != 0:
            raise RuntimeError(f"rank {rank}: trainer `{shlex.join(self.command())}` failed with exit "
                               f"code {rc}; see this task's log")
        return {"rank": rank, "world_size": int(dist["WORLD_SIZE"]), "returncode": rc,
                "master_addr": dist["MASTER_ADDR"], "restarts": _restart_count(),
                "seconds": round(time.time() - t0, 2)}

    def _requeue_and_wait(self, rank: int) -> NoReturn:
        """The trainer saved on a signal: rank 0 requeues the job; every task then waits to be stopped."""
        job_id = os.environ.get("SLURM_JOB_ID")
        if rank == 0 and job_id:
            log.info(f"checkpoint saved ({self._stop or 'trainer request'}); requeueing job {job_id}")
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        self._wait_to_be_stopped(rank, "asked for a requeue")

    def _end_preempted_attempt(self, rank: int) -> NoReturn:
        """The trainer saved on the SIGTERM of a preemption (or a requeue): the job must come back,
        and this attempt must end without a result, which `wait_for` would read as the job's.

        "requeued" (GraceTime=0): SLURM has requeued the job and kills every task KillWait after the
        SIGTERM; requeueing it again would be wrong. "preempted" (GraceTime>0): the job still runs
        in its grace time, and SLURM does not requeue a job that ends in it: rank 0 requeues it, as
        after USR1, unless the grace time ran out during the save and SLURM did (asked again). A
        requeue that SLURM has done already is refused ("Job is pending execution"), so one made
        when SLURM does not answer the second question cannot restart the job twice."""
        job_id = os.environ.get("SLURM_JOB_ID", "")
        if rank == 0 and self._stop == "preempted":
            cause, why = term_cause(job_fields(job_id), _restart_count())
            if cause == "requeued":
                log.info(f"checkpoint saved on preemption; SLURM requeued job {job_id} meanwhile ({why})")
            else:
                log.info(f"checkpoint saved on preemption in the grace time ({why}); requeueing job {job_id}")
                try:
                    r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
                    if r.returncode != 0:
                        log.warning(f"scontrol requeue {job_id} exited {r.returncode}: {r.stderr.strip()}")
                except (OSError, subprocess.SubprocessError) as e:
                    log.warning(f"scontrol requeue {job_id}: {type(e).__name__}: {e}")
        elif rank == 0:
            log.info(f"checkpoint saved; job {job_id} was requeued by SLURM, not requeueing it again")
        self._wait_to_be_stopped(rank, "was preempted")

    def _wait_to_be_stopped(self, rank: int, what: str) -> NoReturn:
        """Wait for SLURM to end this attempt (a requeue stops every task). A task that returned, or
        raised, would leave a result behind for an attempt that did not finish."""
        time.sleep(120)
        job_id = os.environ.get("SLURM_JOB_ID")
        raise RuntimeError(f"rank {rank}: the trainer saved and job {job_id} {what}, but the job was not "
                           "requeued")

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 at timeout/preemption (USR2): wait for the trainer's save.

        The training state lives in run.out_dir (the trainer resumes from it by itself), so the
        resubmitted callable is a fresh copy of this one with the same arguments.
        """
        rc = self._wait_child(timeout_s=max(SIGNAL_DELAY_S - 15, 10))
        log.info(f"checkpoint(): trainer exited with code {rc} "
             f"({'saved' if rc == EXIT_REQUEUE else 'still running' if rc is None else 'not a save'})")
        if rc is None:
            self._forward(signal.SIGTERM)
        return DelayedSubmission(TrainTask(self.config, self.sets, self.root, self.python, self.module))


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="training config (configs/<name>.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (as for trainer.train)")
    p.add_argument("--nodes", default="1", help="N, or MIN-MAX to start on any allocation in the range "
                   "(a requeued job then resumes on whatever it gets)")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: one per GPU, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", dest="time_min", type=int, default=60, help="time limit in minutes")
    p.add_argument("--job-name", default="vdm-train")
    p.add_argument("--log-dir", default=None, help="submitit folder (default: <run.out_dir>/slurm/%%j)")
    p.add_argument("--sbatch", dest="extra_sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, repeatable (e.g. --sbatch qos=high --sbatch exclusive)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job and report its result")
    p.add_argument("--wait-timeout", type=float, default=None, help="give up waiting after this many seconds")
    return p


def resolve_run_dir(config: str, sets: list[str], root: Path) -> Path:
    """Validate the config now (fail before queueing for hours) and return the absolute run.out_dir."""
    from common.config import load_config
    from trainer.config import TrainConfig

    out = Path(load_config(TrainConfig, config, sets).run.out_dir)
    return out if out.is_absolute() else root / out


def executor_kwargs(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    return dict(nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
                cpus_per_task=args.cpus_per_task, partition=args.partition, time_min=args.time_min,
                job_name=args.job_name, extra_sbatch=args.extra_sbatch or None)


def render_sbatch(folder: str, **kw: Any) -> str:
    """The sbatch script submitit would submit for make_executor(folder, **kw), built without SLURM
    (through submitit's private renderer, behind slurm/submitit_compat.py's checks)."""
    from common.submitit_executor import _extra_params
    from slurm.submitit_compat import make_sbatch_string

    min_nodes, node_range = node_params(kw["nodes"])
    params: dict[str, Any] = dict(job_name=kw["job_name"], nodes=min_nodes, ntasks_per_node=kw["tasks_per_node"],
                                  time=kw["time_min"], signal_delay_s=SIGNAL_DELAY_S)
    if kw.get("gpus_per_node"):
        params["gpus_per_node"] = kw["gpus_per_node"]
    if kw.get("cpus_per_task"):
        params["cpus_per_task"] = kw["cpus_per_task"]
    if kw.get("partition"):
        params["partition"] = kw["partition"]
    params["additional_parameters"] = {**_extra_params(kw.get("extra_sbatch")), **node_range}
    params["srun_args"] = srun_args()
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return make_sbatch_string(command=command, folder=folder, **params)


def _finished(job: submitit.Job) -> bool:
    """Whether every task of the job has finished, asking SLURM now (one sacct call).

    `job.done(force_check=True)` alone does not do it for a job of several tasks: submitit does not
    pass force_check on to the tasks, whose own checks ask SLURM at growing intervals (half the time
    since the submission, up to 10 minutes), so a dead multi-node job was noticed that much later. The forced call refreshes the state all the
    tasks read (a task with a result file is done without asking)."""
    job.watcher.get_state(job.job_id, mode="force")
    if not job.done():
        return False
    # Neither sign of an end that done() reads is final for a job that SLURM requeued: result files
    # outlive the attempt that wrote them, and sacct shows an attempt's end (PREEMPTED, NODE_FAIL)
    # until the next attempt starts. The controller knows whether the job will run (again).
    state = controller_state(job.job_id)
    if state in _NOT_SETTLED:
        log.debug(f"job {job.job_id}: every task has a result or sacct says it ended, but it is {state}")
        return False
    return True


# Controller states of a job that runs, will run (again), or is still ending (a requeue shows
# COMPLETING, then PENDING).
_NOT_SETTLED = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


def controller_state(job_id: str, timeout_s: float = 30.0) -> str:
    """The job's state from the controller (squeue), '' when it is not known there (purged when long
    over) or SLURM does not answer."""
    try:
        r = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"], capture_output=True,
                           text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = r.stdout.split() if r.returncode == 0 else []
    return lines[0] if len(lines) == 1 else ""


def wait_for(job: submitit.Job, timeout_s: float | None) -> tuple[bool, Any]:
    """(ok, results or error text). Polls SLURM (sacct) so a job that died without a result (killed,
    node failure, out of memory) is noticed and reported as such, not waited on for ever. A job that
    SLURM requeues (preempted, node failure) is waited through: the result is its last attempt's."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not _finished(job):
        if deadline is not None and time.monotonic() > deadline:
            return False, f"still {job.state} after {timeout_s:.0f} s (not cancelled)"
        time.sleep(2)
    try:
        return True, job.results()
    except FailedJobError as e:  # a task raised (e.g. the trainer failed): its result holds the error
        return False, f"{type(e).__name__}: {str(e).strip()[-3000:]}"
    except UncompletedJobError as e:  # SLURM says finished, but a task wrote no result
        return False, f"died without a result: {type(e).__name__}: {str(e).strip()[-3000:]}"
    except Exception as e:  # noqa: BLE001 - submitit raises several types; all mean "failed"
        return False, f"{type(e).__name__}: {str(e).strip()[-3000:]}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        node_params(args.nodes)
    except ValueError as e:
        print(f"slurm.launch: --nodes: {e}", file=sys.stderr)
        return 2
    root = Path.cwd()
    try:
        run_dir = resolve_run_dir(args.config, args.sets, root)
    except (ValueError, OSError) as e:
        print(f"slurm.launch: invalid config {args.config} {' '.join(args.sets)}: {e}", file=sys.stderr)
        return 2
    folder = args.log_dir or str(run_dir / "slurm" / "%j")
    kw = executor_kwargs(args, folder)
    task = TrainTask(str(Path(args.config).resolve()), args.sets, str(root))
    if args.dry_run:
        print(render_sbatch(folder, **kw))
        print(f"# each task runs: {shlex.join(task.command())}  (cwd {root}; ranks from SLURM_PROCID etc.)")
        return 0
    if not slurm_available():
        print("slurm.launch: no SLURM here (sbatch/srun not found); try --dry-run, or "
              "`sudo slurm/local_cluster.sh up` for a local test cluster", file=sys.stderr)
        return 2
    executor = make_executor(folder, **kw)
    job = executor.submit(task)
    stdout, stderr = job.paths.stdout, job.paths.stderr
    print(f"submitted job {job.job_id} ({args.nodes} node(s) x {kw['tasks_per_node']} task(s))")
    print(f"  logs:        {stdout}  (rank 0; other ranks: _<rank>_log.out)  errors: {stderr}")
    print(f"  run dir:     {run_dir}  (checkpoints/, tb/)")
    print(f"  tensorboard: tensorboard --logdir {run_dir / 'tb'}")
    print(f"  follow:      squeue -j {job.job_id}; tail -f {stdout}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    ok, out = wait_for(job, args.wait_timeout)
    if ok:
        print(f"job {job.job_id} COMPLETED: {out}")
        return 0
    print(f"job {job.job_id} FAILED ({job.state}): {out}\n  log: {stdout}\n  errors: {stderr}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
