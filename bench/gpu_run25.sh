#!/usr/bin/env bash
# Twenty-fifth GPU call (2 GPUs), #8, run as one command: the 12B CPU-offload step beside the same config resident, in
# one launch on one machine, each step split into forward+backward and clip+optimizer (--phases).
set -u
source bench/gpu_env.sh
timeout 270 torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 --attn cudnn \
  --warmup 1 --steps 2 --phases --variants "ac=full,compile=1" "ac=full,compile=1,offload=1" 2>&1 \
  | grep "^{\|Error\|error\|^| " | cut -c1-900 | head -8
