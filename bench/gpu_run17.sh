#!/usr/bin/env bash
# Seventeenth GPU call (2 GPUs): why cuDNN attention trained the 12B model on NaN (gpu_run16), and whether fluxtrain's
# opaque cuDNN op fixes it. (1) Block probe with numerics, flux-dev width, 1 double + 2 single blocks, batch 2: each
# GPU's first variant (flash, eager, no AC) is the reference; dcudnn = diffusers' own cuDNN backend, cudnn = the
# custom op. (2) The 12B full fine-tune with the custom op vs flash, op-SAC + compile, batch 2/GPU, same launch.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
P="python3 bench/block_probe.py --double 1 --single 2 --batch 2 --steps 5"
CUDA_VISIBLE_DEVICES=0 timeout 200 $P --variants flash,none,eager dcudnn,none,eager dcudnn,none dcudnn,ops 2>&1 \
  | grep "^{\|Error" | sed "s/^/gpu0 /" &
CUDA_VISIBLE_DEVICES=1 timeout 200 $P --variants flash,none,eager cudnn,none,eager cudnn,none cudnn,ops flash,ops 2>&1 \
  | grep "^{\|Error" | sed "s/^/gpu1 /" &
wait
timeout ${LIMIT:-330} torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 2 \
  --warmup 2 --steps 4 --variants "ac=selective,ac_ops=1,compile=1,attn=cudnn" "ac=selective,ac_ops=1,compile=1,attn=flash" \
  2>&1 | grep "^{\|Error\|error" | head -20
