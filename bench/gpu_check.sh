#!/usr/bin/env bash
# One GPU check (issue 11): ~8 min on one H100/H200. Writes a markdown table of the small config's
# bf16 training step (step time, samples/s, model TFLOP/s, MFU, peak memory) for single, DDP over NCCL,
# FSDP2 and DeepSpeed ZeRO-2, eager and regionally compiled, with two checkpoint policies; the
# checkpoint-policy table on the GPU; BERT-large captions/s (the sharder's text stage); and the stall
# of a synchronous vs a background (run.async_save) checkpoint; then trainer.plan's planned peak memory and
# step time beside the measured ones (issue 19).
#
#   bash bench/gpu_check.sh                 # on a machine with one CUDA GPU, from the repo root
#   bash bench/gpu_check.sh --dry-run       # CPU: the demo config, one step per case, no compile:
#                                           # checks the plumbing and the table, measures nothing useful
#
# Env: PY (default .venv/bin/python, else python3), OUT (default bench/RESULTS_gpu_check.md),
#      BATCH (per-GPU batch, default 16 = the small config's), BUDGET_S (default 450: cases that would
#      start after it are skipped and listed, so the script ends within ~8 min).
# Each case runs in its own process under `timeout`; a failing case is a table row with its error,
# never the end of the script. Paste the table into BENCHMARKS.md.
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
OUT=${OUT:-bench/RESULTS_gpu_check.md}
BUDGET_S=${BUDGET_S:-450}
START=$(date +%s)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if (( DRY )); then
  CONFIG=configs/demo.yaml; BATCH=${BATCH:-2}; STEPS=1; WARMUP=0; CASE_TIMEOUT=300
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  CONFIG=configs/vdm_t2v_small_16x64.yaml; BATCH=${BATCH:-16}; STEPS=5; WARMUP=2; CASE_TIMEOUT=150
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to $PY; use --dry-run on a CPU" >&2
    exit 2
  fi
fi

{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "\`bash bench/gpu_check.sh$( ((DRY)) && echo ' --dry-run')\` on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)")'),"
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)'), config \`$CONFIG\`, batch $BATCH per GPU, bf16 autocast,"
  echo "median of $STEPS steps after $WARMUP warm-up (synthetic batches: model + strategy, no data loading)."
  echo
  echo "| strategy | checkpoint policy | compile | step s | first step s | samples/s | model TFLOP/s | MFU | peak mem GB | note |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
} > "$TMP/table.md"

SKIPPED=()
run_case() {  # strategy policy compile(0|1)
  local strategy=$1 policy=$2 comp=$3
  local elapsed=$(( $(date +%s) - START ))
  if (( elapsed > BUDGET_S )); then SKIPPED+=("$strategy/$policy/compile=$comp"); return; fi
  local args=(--config "$CONFIG" --strategy "$strategy" --policy "$policy" --precision bf16
              --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP")
  (( comp )) && args+=(--compile)
  (( DRY )) && (( comp )) && args+=(--set run.compile_backend=aot_eager)
  [[ "$strategy" == deepspeed ]] && args+=(--set parallel.zero_stage=2)
  local launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m bench.bench_trainer)
  [[ "$strategy" == single ]] && launcher=("$PY" -m bench.bench_trainer)
  local log="$TMP/$strategy-$policy-$comp.log"
  if timeout "$CASE_TIMEOUT" "${launcher[@]}" "${args[@]}" > "$log" 2>&1; then
    "$PY" - "$log" "$strategy" "$policy" "$comp" >> "$TMP/table.md" <<'EOF'
import json, sys
log, strategy, policy, comp = sys.argv[1:]
rows = [json.loads(l) for l in open(log) if l.startswith("{")]
r = rows[-1]
mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
note = f"recompiles {r['recompiles']}" if "recompiles" in r else ""
print(f"| {strategy} | {policy} | {'yes' if comp == '1' else 'no'} | {r['step_time_s']:.3f} | {r['first_step_s']:.1f} | "
      f"{r['samples_per_s']:.1f} | {r['model_tflops_per_s']:.3g} | {mfu} | {r['peak_mem_gb_max_rank']:.1f} | {note} |")
EOF
  else
    local rc=$?
    local why
    why=$(grep -v '^\s*$' "$log" | tail -1 | tr '|' '/' | cut -c1-120)
    echo "| $strategy | $policy | $( ((comp)) && echo yes || echo no) | - | - | - | - | - | - | failed (rc $rc): $why |" >> "$TMP/table.md"
  fi
  echo "[gpu_check] $strategy $policy compile=$comp done at $(( $(date +%s) - START )) s" >&2
}

# eager first (the reference), then compile, then the sharded strategies; two policies each
run_case single none 0
run_case single selective 0
run_case single all 0
run_case ddp none 0          # the NCCL path on one GPU
run_case fsdp none 0
run_case fsdp selective 0
run_case deepspeed none 0
run_case deepspeed selective 0
(( DRY )) || run_case single none 1
(( DRY )) || run_case fsdp none 1
(( DRY )) || run_case single selective 1

{
  if (( ${#SKIPPED[@]} )); then echo; echo "Skipped for time (BUDGET_S=$BUDGET_S): ${SKIPPED[*]}"; fi
  echo
  echo "## Activation checkpoint policies (batch 1, one step each)"
  echo
} >> "$TMP/table.md"
if (( DRY )); then
  timeout 600 "$PY" -m bench.bench_checkpoint_policy --config "$CONFIG" --policies none all --out - >> "$TMP/table.md" 2>/dev/null \
    || echo "checkpoint-policy bench failed" >> "$TMP/table.md"
else
  timeout 180 "$PY" -m bench.bench_checkpoint_policy --device cuda --precision bf16 --warmup 1 --steps 3 --out - \
    >> "$TMP/table.md" 2>/dev/null || echo "checkpoint-policy bench failed or timed out" >> "$TMP/table.md"
fi

# BERT-large (random weights: the speed does not depend on them) embedding captions, as the sharder does
{
  echo
  echo "## BERT-large captions/s (bf16, batch 64, 32 tokens, random weights)"
  echo
  timeout 120 "$PY" - "$DRY" <<'EOF' || echo "BERT-large check failed or timed out"
import sys, time, torch
from transformers import BertConfig, BertModel
dry = sys.argv[1] == "1"
dev = "cpu" if dry else "cuda"
cfg = BertConfig(hidden_size=1024, num_hidden_layers=2 if dry else 24, num_attention_heads=16, intermediate_size=4096)
model = BertModel(cfg).to(dev, torch.bfloat16).eval()
ids = torch.randint(1000, 20000, (8 if dry else 64, 32), device=dev)
with torch.inference_mode():
    for _ in range(1 if dry else 3):
        model(input_ids=ids)
    if dev == "cuda":
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 1 if dry else 20
    for _ in range(n):
        model(input_ids=ids).last_hidden_state
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
print(f"{ids.shape[0] * n / dt:.0f} captions/s{' (dry run: 2 layers on CPU)' if dry else ''}")
EOF
} >> "$TMP/table.md"

# what a checkpoint stalls training for, synchronous vs run.async_save (issue 10): 1 GPU, single
{
  echo
  echo "## Checkpoint stall, synchronous vs run.async_save (single, JSON per mode)"
  echo
  if (( DRY )); then
    async_args=(--config configs/demo.yaml --saves 2 --every 2)
  else
    async_args=(--config configs/vdm_t2v_small_16x64.yaml --set run.precision=bf16 --set data.batch_size=4
                --saves 3 --every 10)
  fi
  timeout 180 "$PY" -m bench.bench_async_save --strategy single "${async_args[@]}" 2>/dev/null | grep '^{' \
    || echo "async-save bench failed or timed out"
  echo
  echo "## Planned (trainer.plan, MFU 0.4) vs measured, eager cases of the first table"
  echo
  peak=$("$PY" -c 'import torch; from trainer.perf import peak_tflops; print(peak_tflops(torch.device("cuda"), "bf16")[0] or 989.0 if torch.cuda.is_available() else 989.0)' 2>/dev/null || echo 989.0)
  timeout 300 "$PY" -m bench.plan_vs_measured --config "$CONFIG" --batch "$BATCH" --peak-tflops "$peak" \
      "$TMP"/*-0.log 2>/dev/null || echo "plan vs measured failed or timed out"
  echo
  echo "Total $(( $(date +%s) - START )) s."
} >> "$TMP/table.md"

cp "$TMP/table.md" "$OUT"
cat "$OUT"
