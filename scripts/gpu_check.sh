#!/usr/bin/env bash
# One command for a lent GPU (issue 16): every check that needs CUDA, in order, each under its own time limit
# (about 8 minutes in all on one H100/H200), then one markdown report: runs/gpu_check/gpu_check.md.
#
#   bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run  # anywhere: print the plan and check that every command still parses
#
# Steps: bf16/fp16 tolerance and dB determinism tests of the fused kernel first (low precision has never run),
# then the CUDA kernel tests, benchmarks/kernel.py (fused LRKV fwd+bwd vs SDPA MHA), 30-step lrkv_125m and
# mha_125m training under DeepSpeed ZeRO-2 bf16 with the fused kernel (tokens/s, MFU, ratio), lrkv_125m again with
# the rebuild-once op (attn_impl: rebuild), and benchmarks/decode.py (MHA-full, LRKV-full, LRKV-LRQK at 8K-64K).
# A failing step is recorded and the next runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

# Training overrides: the shipped 125m configs, 30 steps, embedded corpus (the GPU machine has no network).
TRAIN=(--train.max_steps=30 --train.micro_batch_size=16 --train.grad_accum=1 --train.warmup_steps=5
       --train.val_every=1000 --train.ckpt_every=1000 --log.every=10 --log.tensorboard=false
       --data.source=shakespeare --model.attn_impl=triton --strategy.name=deepspeed --strategy.devices=1)
CONTEXTS=8192,16384,32768,65536

# name | time limit (s) | command
STEPS=(
  "low_precision|75|$PY -m pytest -q -x -m gpu tests/test_kernels.py tests/test_rebuild_once.py"
  "cuda_tests|60|$PY -m pytest -q tests/test_kernels.py tests/test_rebuild_once.py tests/test_decode_kernel.py"
  "kernel_bench|100|$PY benchmarks/kernel.py --dtype bfloat16"
  "train_lrkv|60|$PY train.py --config lrkv_125m.yaml ${TRAIN[*]} --run.dir=$OUT/runs/lrkv_125m"
  "train_mha|60|$PY train.py --config mha_125m.yaml ${TRAIN[*]} --run.dir=$OUT/runs/mha_125m"
  "train_rebuild|45|$PY train.py --config lrkv_125m.yaml ${TRAIN[*]} --model.attn_impl=rebuild --run.dir=$OUT/runs/lrkv_125m_rebuild"
  "decode_bench|80|$PY benchmarks/decode.py --device cuda --batch 8 --contexts $CONTEXTS --steps 16"
)

field() { cut -d'|' -f"$2" <<< "$1"; }

# The result column: the line(s) of a step's log that carry its numbers.
headline() {
  case "$1" in
    low_precision|cuda_tests) tail -n 1 "$2" ;;
    kernel_bench) grep -E "ratios:" "$2" | sed 's/^ *//' | paste -sd ';' - ;;
    train_*) grep -E "tok/s/device" "$2" | tail -n 1 | grep -oE "[0-9,]+ tok/s/device \| MFU [0-9.na/%]+" ;;
    decode_bench) grep -cE "(MHA|LRKV)-" "$2" | sed 's/$/ rows, below/' ;;
  esac
}

if [ "$DRY" = 1 ]; then
  bash -n "$0" || exit 1
  total=0
  for s in "${STEPS[@]}"; do
    echo "step $(field "$s" 1) (limit $(field "$s" 2) s): $(field "$s" 3)"
    total=$((total + $(field "$s" 2)))
  done
  echo "total limit ${total} s; report: $OUT/gpu_check.md"
  # Each command must still parse here: config overrides resolve, scripts accept their flags, tests collect.
  fail=0
  for s in "${STEPS[@]}"; do  # training steps: their overrides resolve
    read -r _ script args <<< "$(field "$s" 3)"
    [ "$script" = train.py ] || continue
    $PY -m lrkv.config $args > /dev/null || { echo "dry run: train.py overrides do not resolve: $args" >&2; fail=1; }
  done
  for s in "${STEPS[@]}"; do  # benchmark scripts: every flag the step passes is in the script's --help
    read -r _ script args <<< "$(field "$s" 3)"
    [[ "$script" == benchmarks/*.py ]] || continue
    help=$($PY "$script" --help 2>&1) || { echo "dry run: $script --help failed" >&2; fail=1; continue; }
    for flag in $(grep -oE -- "--[a-z][a-z-]*" <<< "$args"); do
      grep -qE -- "$flag\b" <<< "$help" || { echo "dry run: $script has no $flag" >&2; fail=1; }
    done
  done
  n=$($PY -m pytest -q --collect-only -m gpu tests/test_kernels.py tests/test_rebuild_once.py 2>/dev/null | grep -c "::")
  [ "$n" -gt 0 ] || { echo "dry run: no gpu tests collected" >&2; fail=1; }
  [ "$fail" = 0 ] && echo "dry run ok: $n gpu tests collected, every command parses"
  exit "$fail"
fi

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check.sh: no CUDA device here (use --dry-run)" >&2; exit 1; }
mkdir -p "$OUT"
report="$OUT/gpu_check.md"
rows=()
for s in "${STEPS[@]}"; do
  name=$(field "$s" 1); limit=$(field "$s" 2); cmd=$(field "$s" 3)
  echo "== $name (limit $limit s): $cmd"
  t0=$(date +%s)
  timeout "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  status=ok; [ "$rc" = 124 ] && status="timed out"; [ "$rc" != 0 ] && [ "$rc" != 124 ] && status="failed ($rc)"
  rows+=("| $name | $status | $secs | $(headline "$name" "$OUT/$name.log") |")
  echo "   $status in $secs s"
done

tps() { grep -E "tok/s/device" "$OUT/$1.log" | tail -n 1 | grep -oE "[0-9,]+ tok/s/device" | tr -d ', tok/sdevice'; }
lrkv=$(tps train_lrkv); mha=$(tps train_mha); rebuild=$(tps train_rebuild)
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ), $($PY -c 'import torch; print(torch.cuda.get_device_name())'), $(git rev-parse --short HEAD)"
  echo
  echo "| step | status | s | result |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  [ -n "$lrkv" ] && [ -n "$mha" ] && echo "| train lrkv/mha tokens/s | | | $(awk "BEGIN {printf \"%.3f\", $lrkv / $mha}") |"
  [ -n "$rebuild" ] && [ -n "$mha" ] && echo "| train lrkv (rebuild)/mha tokens/s | | | $(awk "BEGIN {printf \"%.3f\", $rebuild / $mha}") |"
  for s in "${STEPS[@]}"; do
    name=$(field "$s" 1)
    printf '\n## %s\n\n```text\n%s\n```\n' "$name" "$(tail -n 60 "$OUT/$name.log")"
  done
} > "$report"
echo "report: $report"
