#!/usr/bin/env bash
# Multi-node training under SLURM: one `python -m trainer.train` per task (one task per GPU), started by srun.
#
#   sbatch [sbatch options] slurm/train.sh configs/<name>.yaml [--set key=value ...]
#
# Submit from the repository root (the job runs there and uses .venv/bin/python when it exists).
# Every #SBATCH default below is overridden by the same option on the sbatch command line, e.g.
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 --cpus-per-task=12 --time=48:00:00 \
#          --partition=gpu slurm/train.sh configs/vdm_t2v_small_16x64.yaml --set run.out_dir=runs/small
# CPU-only (and the local test cluster):  --gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=1
#
# What it does:
# - MASTER_ADDR = first host of SLURM_JOB_NODELIST (`scontrol show hostnames`), MASTER_PORT derived
#   from the job id (29500 + id % 2000, so two jobs sharing a node do not collide);
#   per task RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS (unset -> 1).
# - Preemption / time limit: SLURM sends USR1 to the training processes 120 s before the end
#   (--signal=USR1@120; with --signal=B:USR1@.. it reaches this script, which forwards it to srun,
#   and srun forwards it to every task). The trainer finishes its step, saves a checkpoint and exits
#   75 = "requeue me" (EXIT_REQUEUE in common/exit_codes.py); this script then runs
#   `scontrol requeue`, the job restarts with the
#   same id and the trainer resumes from the latest checkpoint in run.out_dir. The log file is
#   appended to, not replaced. `scancel --signal=USR1 <job>` triggers the same save + requeue by hand.
#   SIGTERM (scancel, preemption with GraceTime=0) reaches this script too and is forwarded: the
#   trainer saves, but the job is NOT requeued by this script (a cancel must stay a cancel; with
#   PreemptMode=REQUEUE SLURM requeues a preempted job by itself). A preempted partition with
#   GraceTime>0 signals only the tasks (SIGTERM, or the --signal one with preempt_send_user_signal):
#   the trainer saves and exits 75, and this script requeues the job as after USR1 (both tested in
#   tests/test_slurm_cluster.py). A USR1 that arrives while the trainer is still starting (before it
#   has its handler) kills it with 128+10; that also requeues: the last checkpoint is intact.
# - Logs: the job's output file (default <submit dir>/<job name>-<job id>.out), linked from
#   <run.out_dir>/logs/slurm-<job id>.out next to the checkpoints/ and tb/ of the run.
#
# Environment knobs: VDM_ROOT (repository, default the submit dir), VDM_PYTHON (interpreter),
# VDM_TRAIN_MODULE (default trainer.train),
# VDM_MAX_REQUEUES (default 100), VDM_SRUN_WAIT (seconds the other ranks may outlive the first one
# to exit, default 120; a crashed rank then cannot leave the others hanging in a collective).
#SBATCH --job-name=vdm-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail
EXIT_REQUEUE=75  # the trainer's "requeue me", as in common/exit_codes.py (tests/test_defaults.py checks they agree)

log() { echo "[train.sh $(date -u +%H:%M:%S) job ${SLURM_JOB_ID:-none}] $*"; }
die() { log "ERROR: $*"; exit 1; }

[ $# -ge 1 ] || die "usage: sbatch [sbatch options] slurm/train.sh configs/<name>.yaml [--set key=value ...]"
CONFIG=$1; shift
SETS=("$@")

ROOT=${VDM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT" || die "cannot cd to $ROOT"
if [ -n "${VDM_PYTHON:-}" ]; then PY=$VDM_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3 || command -v python); fi
MODULE=${VDM_TRAIN_MODULE:-trainer.train}
[ -f "$CONFIG" ] || die "config file $CONFIG does not exist (paths are relative to $ROOT)"

# Validate config + overrides once, before starting processes on every node, and learn the run dir.
RUN_DIR=$("$PY" - "$CONFIG" "${SETS[@]}" <<'EOF'
import sys
from common.config import ConfigError, load_config
from trainer.config import TrainConfig
args = sys.argv[2:]
sets = [args[i + 1] for i in range(len(args) - 1) if args[i] == "--set"]
try:
    print(load_config(TrainConfig, sys.argv[1], sets).run.out_dir)
except ConfigError as e:
    sys.exit(f"config error: {e}")
EOF
) || die "invalid config/overrides: $CONFIG ${SETS[*]}"
case "$RUN_DIR" in /*) ;; *) RUN_DIR=$ROOT/$RUN_DIR;; esac
mkdir -p "$RUN_DIR/logs"

# ------------------------------------------------------------------ rendezvous (same on every task)
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
else
  MASTER_ADDR=127.0.0.1
fi
export MASTER_ADDR
export MASTER_PORT=$(( 29500 + ${SLURM_JOB_ID:-0} % 2000 ))   # = slurm.env.master_port
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

if [ -n "${SLURM_JOB_ID:-}" ]; then
  STDOUT_PATH=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^StdOut=//p')
  [ -n "$STDOUT_PATH" ] && [ -f "$STDOUT_PATH" ] && ln -sfn "$STDOUT_PATH" "$RUN_DIR/logs/slurm-$SLURM_JOB_ID.out"
fi
log "restart ${SLURM_RESTART_COUNT:-0}: nodes=${SLURM_JOB_NODELIST:-local} tasks=${SLURM_NTASKS:-1}" \
    "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT run_dir=$RUN_DIR python=$PY"

# Per task: ranks from SLURM's variables (the trainer also reads them, but torch's env:// wants these).
TASK_CMD='export RANK=${SLURM_PROCID:-0} LOCAL_RANK=${SLURM_LOCALID:-0} WORLD_SIZE=${SLURM_NTASKS:-1}
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1}
echo "[train.sh] rank $RANK/$WORLD_SIZE local_rank $LOCAL_RANK node ${SLURMD_NODENAME:-$(hostname)} MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
exec "$@"'

if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
  # Tasks from the allocation this attempt got (nodes x tasks per node), not SLURM_NTASKS: that keeps
  # its submission-time value, so a job requeued on fewer nodes (--nodes=MIN-MAX, or a node lost)
  # would otherwise start the old number of tasks on the nodes it has. The trainer resumes on any count.
  PER_NODE=${SLURM_NTASKS_PER_NODE:-}; PER_NODE=${PER_NODE%%(*}; PER_NODE=${PER_NODE%%,*}
  SIZE=()
  if [ -n "${SLURM_JOB_NUM_NODES:-}" ] && [ -n "$PER_NODE" ]; then
    SIZE=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks=$(( SLURM_JOB_NUM_NODES * PER_NODE )))
  fi
  LAUNCH=(srun "${SIZE[@]}" --kill-on-bad-exit=0 --wait="${VDM_SRUN_WAIT:-120}" bash -c "$TASK_CMD" task)
else   # outside SLURM (debugging the script itself): one local task
  LAUNCH=(bash -c "$TASK_CMD" task)
fi

# ------------------------------------------------------------------ run, forwarding signals
CHILD=
GOT_TERM=0
forward() {  # forward a signal to srun, which passes it on to every task
  log "received SIG$1, forwarding to the training tasks"
  [ "$1" = USR1 ] || GOT_TERM=1
  [ -n "$CHILD" ] && kill -s "$1" "$CHILD" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT

"${LAUNCH[@]}" "$PY" -m "$MODULE" --config "$CONFIG" "${SETS[@]}" &
CHILD=$!
# `wait` returns early (status > 128) whenever a trapped signal arrives; keep waiting for the tasks.
while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; done
wait "$CHILD"; rc=$?
log "training tasks exited with code $rc"

if [ "$rc" = 138 ]; then
  # 128 + SIGUSR1: the signal came while the trainer was still starting up (before it installs its
  # handler, e.g. a job started close to its time limit). Nothing new was saved, but the last
  # checkpoint is intact, so requeueing and resuming from it is still the right thing to do.
  log "the tasks died from SIGUSR1 during start-up; requeueing to resume from the last checkpoint"
  rc=$EXIT_REQUEUE
fi
if [ "$rc" = "$EXIT_REQUEUE" ]; then
  restarts=${SLURM_RESTART_COUNT:-0}
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    log "checkpoint saved; not under SLURM, so not requeued"; exit "$EXIT_REQUEUE"
  elif [ "$GOT_TERM" = 1 ]; then
    # scancel (or a preemption without grace time, which SLURM requeues by itself) sent SIGTERM to
    # this script too: requeueing here would undo a user's cancel.
    log "checkpoint saved; job was cancelled or preempted by SLURM, not requeueing it here"; exit "$EXIT_REQUEUE"
  elif [ "$restarts" -ge "${VDM_MAX_REQUEUES:-100}" ]; then
    log "checkpoint saved; restart count $restarts reached VDM_MAX_REQUEUES, not requeueing"; exit "$EXIT_REQUEUE"
  fi
  log "checkpoint saved; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
  if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  log "scontrol requeue failed (job cancelled, or requeue not allowed); resume by resubmitting with the same run.out_dir"
  exit "$EXIT_REQUEUE"
fi
exit "$rc"
