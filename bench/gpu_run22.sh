#!/usr/bin/env bash
# Twenty-second GPU call, the first on 4 GPUs (nvidia-h200-x4), #8: the 12B full fine-tune FULL_SHARD over 4 H200s
# with the sync-free fused step (clip as grad_scale, non-finite skip as found_inf, the norm read after the step is
# queued): op-SAC at batch 2 (the 2-GPU 40.0% configuration; the planner says it fits an 80 GB H100 too), no AC at
# batch 2, op-SAC at batch 4, each profiled. Then fp8 on the block probe (one GPU): which recipe, AC and compile
# combinations build and how close their gradients are to bf16's.
set -u
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
timeout ${LIMIT:-380} torchrun --nproc_per_node 4 bench/train_step.py --preset flux-dev --resolution 1024 --batch 2 \
  --warmup 2 --steps 3 --profile /tmp/prof --variants "ac=selective,ac_ops=1,compile=1,attn=cudnn" \
  "ac=none,compile=1,attn=cudnn" "ac=selective,ac_ops=1,compile=1,attn=cudnn,batch=4" 2>&1 \
  | grep "^{\|Error\|error\|^| " | cut -c1-1500 | head -30
for t in /tmp/prof/*.json.gz; do echo "== $t"; python3 -m fluxtrain trace "$t" --top 12; done
timeout ${PLIMIT:-150} python3 bench/block_probe.py --double 1 --single 2 --batch 2 --steps 3 --variants \
  cudnn,ops cudnn,ops,fp8 cudnn,none,fp8 cudnn,ops,fp8row cudnn,none,eager,fp8 2>&1 | grep "^{" | head -10
