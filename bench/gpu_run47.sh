#!/usr/bin/env bash
# 2 × H200 (nvidia-h200-x2), carry [".whl"], ~9.5 minutes, two independent jobs side by side:
#   GPU 0 (#8): bench/gpu_run45.sh, the 12B full fine-tune on ONE GPU with AdamW's moments on the host (bf16, then
#               fp32), each row beside the planner's prediction;
#   GPU 1 (#6): one stage of the chain with the medium preset (40.0M), 8,000 steps decayed to 0, against the small
#               preset's 43.8-45.3% at 8,000 steps (STAGES=1 PRESET=medium bench/gpu_chain.sh). Its weights don't
#               come back (a call returns 8 files): the scores, the curve and the logs do.
# Not run: the 2-GPU kind was withdrawn before it (thirteenth session); GPU 0's part ran alone as gpu_run48/49.
set -u
source bench/gpu_env.sh  # installs the wheels once, before the two jobs start (each sources it again: a no-op)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
(CUDA_VISIBLE_DEVICES=1 OUT=/tmp/chain-out STAGES=1 PRESET=medium bash bench/gpu_chain.sh > "$OUT/chain.txt" 2>&1
 cp /tmp/chain-out/sweep.json /tmp/chain-out/logs.tgz "$OUT/" 2>/dev/null) &
CUDA_VISIBLE_DEVICES=0 OUT=$OUT bash bench/gpu_run45.sh
wait
tail -22 "$OUT/chain.txt"
