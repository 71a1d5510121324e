#!/usr/bin/env bash
# #6 on 1 GPU, ~8.5 minutes (the session's last device time): gpu_run41's cosine run (8,000 steps, bound T5) with
# training seed 1, for the spread; its final checkpoint also scored at CFG 2.5 and 6 and with 50 sampling steps.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 545 python3 bench/adherence_sweep.py --work /tmp/sweep --out "$OUT" --max-minutes ${MAX_MIN:-6.3} \
  --num 32000 --chunks 16 --cuda-graphs --batch 256 --curve --seeds 1 --encoders "$PWD/.whl/tiny-bind" \
  --variants "cos8k=--train.steps 8000 --optim.schedule cosine --checkpoint.interval 1000 --checkpoint.keep 20" \
  --evals "cfg4=--true-cfg 4" "cfg2.5=--true-cfg 2.5" "cfg6=--true-cfg 6" "cfg4s50=--true-cfg 4 --steps 50" \
  2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -40
cd /tmp/sweep && tar czf "$OUT/logs.tgz" train-*.log runs/*/metrics.jsonl runs/*/config.toml evals/*.json \
  curve/*.json 2>/dev/null
cp /tmp/sweep/evals/*cfg4-*failures*.png "$OUT/" 2>/dev/null; ls -la "$OUT"
