#!/usr/bin/env bash
# #6 on 2 GPUs (nvidia-h200-x2), ~8 minutes: what learns the benchmark fastest. bench/adherence_sweep.py on the "all"
# arm's data (complex_clean, 32k), 10 runs at once (5 per GPU, CUDA graphs), 4 minutes each, every run scored under
# four eval settings (CFG 4 at 20 and 50 steps, CFG 2, CFG 7).
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 575 python3 bench/adherence_sweep.py --work /tmp/sweep --out "$OUT" --max-minutes ${MAX_MIN:-4} \
  --num 32000 --chunks 16 --cuda-graphs \
  --variants "base=" "base_s1=--train.seed 1 --data.seed 1" "lr2e3=--optim.lr 2e-3" "lr5e4=--optim.lr 5e-4" \
    "b256=--train.batch_size 256" "r128=--res 128" "tiny=--model.preset tiny" \
    "uniform=--train.timestep_sampling uniform" "noshift=--train.shift false" "noema=--ema.enabled false" \
  --evals "cfg4=--true-cfg 4" "cfg4s50=--true-cfg 4 --steps 50" "cfg2=--true-cfg 2" "cfg7=--true-cfg 7" \
  2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -60
cd /tmp/sweep && tar czf "$OUT/logs.tgz" train-*.log warm*.log eval-*.log evals runs/*/metrics.jsonl runs/*/config.toml 2>/dev/null
ls -la "$OUT"
