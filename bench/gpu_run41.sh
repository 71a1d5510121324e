#!/usr/bin/env bash
# #6 on 1 GPU, ~9 minutes: gpu_run40 (bound T5, one run alone, b256, CUDA graphs; constant lr 1e-3 stopped by the
# clock: complex 32.8% at 7,728 steps) with a fixed budget of 8,000 steps and a cosine decay to 0 instead, the
# usual gain of annealing in a short run. Same data, seed, checkpoints and scoring.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 575 python3 bench/adherence_sweep.py --work /tmp/sweep --out "$OUT" --max-minutes ${MAX_MIN:-6.3} \
  --num 32000 --chunks 16 --cuda-graphs --batch 256 --curve --seeds 0 --encoders "$PWD/.whl/tiny-bind" \
  --variants "cos8k=--train.steps 8000 --optim.schedule cosine --checkpoint.interval 1000 --checkpoint.keep 20" \
  --evals "cfg4=--true-cfg 4" 2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -40
cd /tmp/sweep && tar czf "$OUT/logs.tgz" train-*.log runs/*/metrics.jsonl runs/*/config.toml evals/*.json \
  curve/*.json 2>/dev/null
cp /tmp/sweep/evals/*failures*.png "$OUT/" 2>/dev/null; ls -la "$OUT"
