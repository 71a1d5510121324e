#!/usr/bin/env bash
# For the next GPU call (#6), 2+ GPUs, ~9 minutes: gpu_run37's learning curve with the T5 trained to bind (made on
# the machine, bench/adherence_ablation.py's resolve_encoders): how far complex prompts climb with samples. Then the
# ablation v6 with those encoders: `RPG=1 BATCH=256 ARMS="baseline clean" bash bench/gpu_run15.sh` and so on, in
# rounds (one run per GPU), and `--merge` of the tables.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 580 python3 bench/adherence_sweep.py --work /tmp/sweep --out "$OUT" --max-minutes ${MAX_MIN:-6} \
  --num 32000 --chunks 16 --cuda-graphs --batch 256 --curve --seeds 0 1 --encoders bind \
  --variants "bind=--checkpoint.interval 1000 --checkpoint.keep 20" --evals "cfg4=--true-cfg 4" \
  2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -40
cp /tmp/sweep/evals/*failures*.png "$OUT/" 2>/dev/null; ls -la "$OUT"
