#!/usr/bin/env bash
# #6 on 1 GPU (only nvidia-h200 lent, tenth session), ~9.5 minutes: gpu_run39's learning curve on one GPU, one seed
# so that the run has the GPU to itself (~6,000 samples/s): the T5 trained to bind (the carried .whl/tiny-bind, made
# by `python -m fluxtrain.models.tiny --text-binding`), batch 256, CUDA graphs, 6 minutes, a checkpoint every 1,000
# steps, every checkpoint scored (CFG 4): where complex prompts level off.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 575 python3 bench/adherence_sweep.py --work /tmp/sweep --out "$OUT" --max-minutes ${MAX_MIN:-6} \
  --num 32000 --chunks 16 --cuda-graphs --batch 256 --curve --seeds 0 --encoders "$PWD/.whl/tiny-bind" \
  --variants "bind=--checkpoint.interval 1000 --checkpoint.keep 20" --evals "cfg4=--true-cfg 4" \
  2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -40
cd /tmp/sweep && tar czf "$OUT/logs.tgz" train-*.log warm*.log runs/*/metrics.jsonl runs/*/config.toml \
  evals/*.json curve/*.json 2>/dev/null
cp /tmp/sweep/evals/*failures*.png /tmp/sweep/curve/*failures*.png "$OUT/" 2>/dev/null; ls -la "$OUT"
