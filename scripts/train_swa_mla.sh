#!/usr/bin/env bash
# Launch SWA-MLA training with the JAX trainer (the seed's scripts/train_swa_mla.sh).
#
#   scripts/train_swa_mla.sh [SIZE] [BATCH] [BLOCK] [OUTPUT_DIR] [RESUME] [OPTIMIZER] [-- extra flags]
#   scripts/train_swa_mla.sh small 8 2048 out/small auto adamw -- --source shards --train_paths data/fw
#   scripts/train_swa_mla.sh tiny 2 64 -- --source shards --train_paths data/fw
#
# Every positional is optional (defaults: small 8 2048 out/SIZE auto adamw); they end at "--" or
# at the first flag. Extra flags go to train_jax.py unchanged. Relative paths (OUTPUT_DIR,
# --train_paths...) are relative to the directory you run this from. FP8 matmuls are turned on by
# themselves when every visible GPU is an H100 or H200 (set SWAMLA_FP8=0 to keep bfloat16).
# PYTHON names the interpreter (default: python3).
set -euo pipefail
pos=()
while [ $# -gt 0 ] && [ ${#pos[@]} -lt 6 ] && [[ "$1" != -* ]]; do
  pos+=("$1"); shift
done
[ "${1:-}" = "--" ] && shift
size=${pos[0]:-small}; batch=${pos[1]:-8}; block=${pos[2]:-2048}; out=${pos[3]:-out/$size}
resume=${pos[4]:-auto}; optimizer=${pos[5]:-adamw}

fp8=()
if [ "${SWAMLA_FP8:-auto}" != "0" ] && command -v nvidia-smi >/dev/null 2>&1; then
  names=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true)
  if [ -n "$names" ] && ! grep -qviE 'H100|H200' <<<"$names"; then
    fp8=(--use_fp8)
    echo "FP8: on ($(head -n1 <<<"$names"))"
  fi
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "${PYTHON:-python3}" "$root/train_jax.py" --size "$size" --batch_size "$batch" \
  --block_size "$block" --output_dir "$out" --resume "$resume" --optimizer_type "$optimizer" \
  ${fp8[@]+"${fp8[@]}"} "$@"
