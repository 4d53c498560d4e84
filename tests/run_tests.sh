#!/usr/bin/env bash
# The test suite as `make test` runs it. Starts the local SLURM cluster when this machine can
# (root + Debian packages) and stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
started_slurm=0
if [ -x slurm/local_cluster.sh ] && [ "${VDM_SKIP_SLURM:-0}" != 1 ]; then
  if ! scontrol ping >/dev/null 2>&1; then
    slurm/local_cluster.sh up
    started_slurm=1
  fi
fi
cleanup() { if [ "$started_slurm" = 1 ]; then slurm/local_cluster.sh down || true; fi; }
trap cleanup EXIT
"$PY" -m pytest -q "$@"
