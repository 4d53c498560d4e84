#!/usr/bin/env bash
# The test suite as `make test` runs it. Starts the local SLURM cluster when this machine can
# (root + Debian packages, installed by local_cluster.sh when missing) and stops only what it
# started. A cluster that fails to come up does not stop the other tests: the slurm tests then
# fail under CI=true (and skip elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
started_slurm=0
if [ -x slurm/local_cluster.sh ] && [ "${VDM_SKIP_SLURM:-0}" != 1 ] && [ "$(id -u)" = 0 ]; then
  if ! timeout 5 scontrol ping >/dev/null 2>&1; then
    if slurm/local_cluster.sh up; then
      started_slurm=1
    else
      echo "WARNING: slurm/local_cluster.sh up failed; the slurm tests will fail (CI) or skip" >&2
      slurm/local_cluster.sh down >/dev/null 2>&1 || true
    fi
  fi
fi
cleanup() { if [ "$started_slurm" = 1 ]; then slurm/local_cluster.sh down || true; fi; }
trap cleanup EXIT
# Three xdist workers on two cores: the SLURM tests (one unit of work, tests/conftest.py) mostly wait on the
# cluster, so a third worker keeps both cores busy meanwhile. VDM_TEST_WORKERS=0 runs in one process.
WORKERS=${VDM_TEST_WORKERS:-3}
PARALLEL=()
if [ "$WORKERS" != 0 ]; then PARALLEL=(-n "$WORKERS" --dist loadscope --no-loadscope-reorder); fi
"$PY" -m pytest -q "${PARALLEL[@]}" --durations=15 "$@"  # the slowest tests listed: CI time stays visible
