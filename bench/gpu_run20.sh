#!/usr/bin/env bash
# Twentieth GPU call (2 GPUs): where the best 12B step's time goes — op-SAC + compile + cuDNN op, batch 2/GPU, with
# two profiled steps summarised by `fluxtrain trace` (GPU busy/idle, kernel time by kind, exposed communication).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
timeout ${LIMIT:-200} torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 2 \
  --warmup 2 --steps 3 --profile /tmp/prof --variants "ac=selective,ac_ops=1,compile=1,attn=cudnn" 2>&1 \
  | grep "^{\|Error\|error" | head -5
for t in /tmp/prof/*.json.gz; do python3 -m fluxtrain trace "$t"; done
