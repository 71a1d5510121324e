#!/usr/bin/env bash
# #8, nvidia-h200-x4: parallel.optimizer_offload (AdamW's moments in pinned host memory, streamed through the GPU
# unit by unit behind the next forward). (0) its CUDA test (pinned moments, equal to fused AdamW with clip and skip);
# stop there if it fails. (1) 12B, 4 GPUs, batch 4, op-SAC + compile + cuDNN op: offload first (its peak measured
# clean), then resident. (2) 12B, 2 GPUs, batch 2, op-SAC: offload vs resident, offload first.
set -u
source bench/gpu_env.sh
python3 -m pytest -q -p no:cacheprovider tests/parallel/test_optimizer_offload.py 2>&1 | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
V="ac=selective,ac_ops=1,compile=1"
timeout 290 torchrun --nproc_per_node 4 bench/train_step.py --preset flux-dev --resolution 1024 --batch 4 \
  --attn cudnn --warmup 2 --steps 5 --variants "$V,ooff=1" "$V" 2>&1 | grep "^{\|Error\|error\|^| \|failed" | cut -c1-900
CUDA_VISIBLE_DEVICES=0,1 timeout 210 torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev \
  --resolution 1024 --batch 2 --attn cudnn --warmup 2 --steps 4 --variants "$V,ooff=1" "$V" 2>&1 \
  | grep "^{\|Error\|error\|^| \|failed" | cut -c1-900
