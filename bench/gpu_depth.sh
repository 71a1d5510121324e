#!/usr/bin/env bash
# #6 on 2 GPUs, one call (~9 minutes): is depth the lever for binding? The small preset's failures at its ~70-80%
# plateau are binding failures (an object drawn with another one's colour or shape, one copy too many), and the
# double blocks are where text and image tokens meet. Two runs from random init side by side, one per GPU, the same
# data, seed and steps (a cosine decay to 0 over STEPS): small (4 double + 8 single blocks, 17.9M) and deep (8 double
# + 8 single, 27.4M). Seed-0 scores of one schedule differ by up to ~15 points between calls (fifteenth session),
# so the control runs in the same call. Scored with 3 eval seeds (192 complex renders each).
#   BIND=1 bash bench/gpu_wheels.sh (here, once), then: bash bench/gpu_depth.sh      carry [".whl"]
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# DEEPER=1: deep against deeper (12 double + 8 single, 36.8M) instead of small against deep
V=("small=" "deep=--model.preset deep")
[ -n "${DEEPER:-}" ] && V=("deep=--model.preset deep" "deeper=--model.preset deeper")
ENC=$([ -d .whl/tiny-bind ] && echo "$PWD/.whl/tiny-bind" || echo bind)
timeout ${LIMIT:-565} python3 bench/adherence_sweep.py --work /tmp/depth --out "$OUT" --max-minutes ${MAX_MIN:-5.5} \
  --deadline-minutes 9.3 --eval-reserve-s 90 --num ${NUM:-24000} --chunks 16 --data-seed 1 --cuda-graphs \
  --batch 256 --preset small --data complex_clean --seeds ${SEED:-0} --encoders "$ENC" --steps ${STEPS:-4500} \
  --schedule cosine --lr 1e-3 --eval-seeds 0 1 2 --variants "${V[@]}" \
  --evals "cfg4s50=--true-cfg 4 --steps 50" 2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -16
cd /tmp/depth && tar czf "$OUT/logs.tgz" train-*.log runs/*/metrics.jsonl runs/*/config.toml evals/*.json 2>/dev/null
cp /tmp/depth/evals/*-e0-failures.png "$OUT/" 2>/dev/null; ls -la "$OUT"
