#!/usr/bin/env bash
# Eighteenth GPU call (2 GPUs): the 12B full fine-tune with fluxtrain's cuDNN attention op at the batch that fills an
# H200 (op-SAC, batch 3/GPU) vs flash at the same batch, and without activation checkpointing (batch 1/GPU).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
timeout ${LIMIT:-420} torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 3 \
  --warmup 2 --steps 4 --variants "ac=selective,ac_ops=1,compile=1,attn=cudnn" "ac=none,compile=1,attn=cudnn,batch=1" \
  "ac=selective,ac_ops=1,compile=1,attn=flash" 2>&1 | grep "^{\|Error\|error" | head -20
