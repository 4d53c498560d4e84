#!/bin/bash
# usage: [PATCH=a,b] [SEEDS=4] [GW=w] [THREADS=1] [WORK=/tmp/motion_ablation] run.sh NAME DATA DIRS [--set k=v ...]
# Trains the demo config on DATA/shards (made by mkdata.py) with the named patches applied, exports the EMA
# weights and prints the direction read back from samples of "a {colour} square moving {d}" for d in DIRS.
set -euo pipefail
name=$1; data=$(realpath "$2"); dirs=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
out=${WORK:-/tmp/motion_ablation}/exp_$name; rm -rf "$out"; mkdir -p "$out"
py=${PYTHON:-$root/.venv/bin/python}
cd "$root"
export OMP_NUM_THREADS=${THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$root
start=$(date +%s)
"$py" "$here/patched.py" train --config configs/demo.yaml --set data.shards="$data/shards" --set data.val_shards="$data/val_shards" \
  --set run.out_dir="$out/run" --set run.sample_every=100000 --set run.val_every=100000 --set run.eval_every=0 \
  --set data.num_workers=0 "$@" > "$out/train.log" 2>&1 || { echo FAIL; tail "$out/train.log"; exit 1; }
t=$(( $(date +%s) - start ))
"$py" "$here/patched.py" export --checkpoint "$out/run" --out "$out/model.safetensors" > /dev/null 2>&1
"$py" "$here/patched.py" ev "$out/model.safetensors" "$dirs" "${SEEDS:-3}" ${GW:-} > "$out/eval.txt" 2>&1
echo "== $name ($*) train ${t}s"; grep -v Loading "$out/eval.txt"
