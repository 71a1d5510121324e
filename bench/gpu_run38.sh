#!/usr/bin/env bash
# #6 on 2 GPUs, ~3.5 minutes (the session's last device time): gpu_run37 with text encoders whose T5 was trained to
# bind (`python -m fluxtrain.models.tiny --text-binding fluxtrain/assets/tiny-flux --out .whl/tiny-bind`, carried),
# 90 s per run, b256, two seeds: compare with gpu_run37's curve at the same step.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 215 python3 bench/adherence_sweep.py --work /tmp/sweep --out "$OUT" --max-minutes ${MAX_MIN:-1.5} \
  --num 16000 --chunks 16 --cuda-graphs --batch 256 --seeds 0 1 --encoders "$PWD/.whl/tiny-bind" \
  --variants "bind=" --evals "cfg4=--true-cfg 4" 2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -12
cp /tmp/sweep/evals/*failures*.png "$OUT/" 2>/dev/null
