#!/usr/bin/env bash
# For a next one-GPU call (#8): the 12B full fine-tune on ONE H200, which fits only with AdamW's moments on the host
# (`fluxtrain plan --gpus 1 --gpu-mem-gib 139 --host-mem-gib 128 --data.source cache`: 128.9 GiB with a 23 GiB
# ring). bf16 moments first (44 GiB pinned), then fp32 ones (89 GiB of the machine's 128 GiB: the planner's limit).
# Each row beside the planner's prediction. ~8 minutes (pinning 44-89 GB takes 1-2 min per variant).
#   carry [".whl"]:  bash bench/gpu_run45.sh
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
free -g | head -2
python3 -m fluxtrain plan --config configs/flux-dev.toml --gpus 1 --gpu-mem-gib 139 --host-mem-gib 128 \
  --data.source cache --parallel.activation_checkpointing selective --parallel.ac_ops true --train.compile true \
  --parallel.optimizer_offload true --parallel.optimizer_offload_dtype bf16 --parallel.optimizer_offload_buffer_gib 16 \
  --checkpoint.async_save false --train.grad_accum 1 2>&1 | tail -4
# one launch per variant: an earlier variant's weights and ring stay allocated into the next (RESULTS.md, seventh and
# twelfth sessions), and at 12B on one GPU that alone would not fit
V="ac=selective,ac_ops=1,compile=1,ooff=1,obuf=16"
for odt in ${ODTS:-bf16 fp32}; do
  timeout 260 torchrun --nproc_per_node 1 bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 \
    --attn cudnn --warmup 2 --steps ${STEPS:-4} --variants "$V,odt=$odt" > "$OUT/bench-$odt.log" 2>&1
  echo "rc=$? at ${SECONDS}s"
  grep "^{\|Error\|error\|^| \|failed\|left allocated\|held by" "$OUT/bench-$odt.log" | cut -c1-900
done
