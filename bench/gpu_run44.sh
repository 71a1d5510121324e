#!/usr/bin/env bash
# For a next GPU call (#8, optimizer offload ≤ 15% without the 16 GiB ring): AdamW's moments offloaded in bf16
# (parallel.optimizer_offload_dtype = bf16: half the bytes each way, rounded back stochastically) against fp32 ones
# and the resident optimizer, in one launch. First the offload tests on the GPU (the bf16 path's CUDA side, its
# compiled rounding kernel and its ring twin have only run on the CPU). ~7 minutes.
#   4 GPUs (nvidia-h200-x4): bash bench/gpu_run44.sh                       12B, batch 4/GPU, as gpu_run28/30
#   2 GPUs:                  NPROC=2 BATCH=2 bash bench/gpu_run44.sh       12B, batch 2/GPU
#   1 GPU:                   NPROC=1 DEPTH=6,12 BATCH=2 bash bench/gpu_run44.sh   a third of the depth, full width
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_optimizer_offload.py 2>&1 | tail -4
V="ac=selective,ac_ops=1,compile=1"
timeout 400 torchrun --nproc_per_node "${NPROC:-4}" bench/train_step.py --preset flux-dev --resolution 1024 \
  ${DEPTH:+--depth $DEPTH} --batch "${BATCH:-4}" --attn cudnn --warmup 2 --steps 5 \
  --variants "$V,ooff=1,odt=bf16" "$V,ooff=1" "$V,ooff=1,odt=bf16,obuf=6" "$V" > "$OUT/bench.log" 2>&1
grep "^{\|Error\|error\|^| \|failed" "$OUT/bench.log" | cut -c1-900
