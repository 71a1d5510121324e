#!/usr/bin/env bash
# For a next GPU call (#8, fp8 at 1.16x of bf16 against the 1.2x goal): where the fp8 step's time goes. 12B, 4 GPUs,
# batch 4, op-SAC + compile + cuDNN op: bf16 and fp8 tensorwise (bf16 all-gather) in one launch, each profiled on
# rank 0; `fluxtrain trace` then splits kernel time by kind (matmul, attention, fused elementwise: fp8's casts and
# amax reductions, other). The fp8 kernels' share against the GEMM time saved says whether fewer casts (one cast of a
# block input shared by q/k/v/mlp) can reach 1.2x. ~6 minutes.
set -u
source bench/gpu_env.sh
V="ac=selective,ac_ops=1,compile=1"
timeout 420 torchrun --nproc_per_node 4 bench/train_step.py --preset flux-dev --resolution 1024 --batch 4 \
  --attn cudnn --warmup 2 --steps 3 --profile /tmp/prof --variants "$V" "$V,fp8=1" 2>&1 \
  | grep "^{\|Error\|error\|^| " | cut -c1-1500 | head -12
for t in /tmp/prof/*.json.gz; do echo "== $t"; python3 -m fluxtrain trace "$t" --top 15; done
