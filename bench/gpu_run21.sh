#!/usr/bin/env bash
# For the next 2-GPU call (#8), not yet run: (1) the 40% configuration again, profiled, now with gradient clipping
# folded into fused AdamW (compare with gpu_run20: optimizer 118 ms, 1.137 s/step); (2) CPU offload with the
# offloaded optimizer on each rank's share of the cores (parallel.cpu_threads auto; was 19.9 s/step on one core).
set -u
source bench/gpu_env.sh
timeout 200 torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 2 \
  --warmup 2 --steps 3 --profile /tmp/prof --variants "ac=selective,ac_ops=1,compile=1,attn=cudnn" 2>&1 \
  | grep "^{\|Error\|error" | head -5
for t in /tmp/prof/*.json.gz; do python3 -m fluxtrain trace "$t"; done
timeout 300 torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 --attn cudnn \
  --warmup 1 --steps 2 --variants "ac=full,compile=1,offload=1" 2>&1 | grep "^{\|Error\|error" | head -5
