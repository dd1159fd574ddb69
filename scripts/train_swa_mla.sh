#!/usr/bin/env bash
# Launch SWA-MLA training with the JAX trainer (the seed's scripts/train_swa_mla.sh).
#
#   scripts/train_swa_mla.sh [SIZE] [BATCH] [BLOCK] [OUTPUT_DIR] [RESUME] [OPTIMIZER] [-- extra flags]
#   scripts/train_swa_mla.sh small 8 2048 out/small auto adamw -- --source shards --train_paths data/fw
#
# FP8 matmuls are turned on by themselves when every visible GPU is an H100 or H200 (set
# SWAMLA_FP8=0 to keep bfloat16). Extra flags after "--" go to train_jax.py unchanged.
set -euo pipefail
size=${1:-small}; batch=${2:-8}; block=${3:-2048}; out=${4:-out/$size}
resume=${5:-auto}; optimizer=${6:-adamw}
shift $(( $# < 6 ? $# : 6 ))
[ "${1:-}" = "--" ] && shift

fp8=()
if [ "${SWAMLA_FP8:-auto}" != "0" ] && command -v nvidia-smi >/dev/null 2>&1; then
  names=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true)
  if [ -n "$names" ] && ! grep -qviE 'H100|H200' <<<"$names"; then
    fp8=(--use_fp8)
    echo "FP8: on ($(head -n1 <<<"$names"))"
  fi
fi

cd "$(dirname "$0")/.."
exec python train_jax.py --size "$size" --batch_size "$batch" --block_size "$block" \
  --output_dir "$out" --resume "$resume" --optimizer_type "$optimizer" "${fp8[@]}" "$@"
