#!/usr/bin/env bash
# #6 on 2 GPUs (nvidia-h200-x2), ~9 minutes: a learning curve. gpu_run36's sweep found no setting that learns the
# benchmark much faster in 4 minutes (complex 0-6%, simple 2-25%, single objects 50-100%). Here each GPU trains one
# run alone (CUDA graphs, batch 256, the "all" arm's data without ITC) for 6 minutes, two seeds, a checkpoint every
# 1000 steps, every checkpoint scored (CFG 4): how the pass rates grow with samples, to size the budget 90% needs.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 580 python3 bench/adherence_sweep.py --work /tmp/sweep --out "$OUT" --max-minutes ${MAX_MIN:-6} \
  --num 32000 --chunks 16 --cuda-graphs --batch 256 --curve --seeds 0 1 \
  --variants "b256=--checkpoint.interval 1000 --checkpoint.keep 20" --evals "cfg4=--true-cfg 4" \
  2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -40
cd /tmp/sweep && tar czf "$OUT/logs.tgz" train-*.log warm*.log runs/*/metrics.jsonl runs/*/config.toml \
  evals/*.json curve/*.json 2>/dev/null
cp /tmp/sweep/evals/*failures*.png "$OUT/" 2>/dev/null; ls -la "$OUT"
