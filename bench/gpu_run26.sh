#!/usr/bin/env bash
# For the next call (#8), not yet run. NGPU=4 on nvidia-h200-x4 where lent, else NGPU=2 (batch 2):
# (1) the 12B, op-SAC: bf16 vs fp8 tensorwise (bf16 all-gather) vs fp8 rowwise_with_gw_hp, one launch (gpu_run23/24
# measured 1.10x and 1.09x in separate launches); (2) fp8 numerics over 300 steps: flux-dev width with 2 double + 4
# single blocks, one GPU, every step's loss per variant to $OUT/fp8_losses.json; (3) the offload step with the
# cgroup-aware thread count in its row.
set -u
source bench/gpu_env.sh
NGPU=${NGPU:-4}; B=$([ "$NGPU" -ge 4 ] && echo 4 || echo 2)
timeout 330 torchrun --nproc_per_node "$NGPU" bench/train_step.py --preset flux-dev --resolution 1024 --batch "$B" \
  --attn cudnn --warmup 2 --steps 3 --variants "ac=selective,ac_ops=1,compile=1" \
  "ac=selective,ac_ops=1,compile=1,fp8=1,fp8_recipe=tensorwise" \
  "ac=selective,ac_ops=1,compile=1,fp8=1,fp8_recipe=rowwise_with_gw_hp" 2>&1 | grep "^{\|Error\|error\|^| " | cut -c1-600
CUDA_VISIBLE_DEVICES=0 timeout 150 torchrun --nproc_per_node 1 bench/train_step.py --preset flux-dev --depth 2,4 \
  --resolution 512 --batch 4 --attn cudnn --warmup 0 --steps 300 --losses "${OUT:-/tmp}/fp8_losses.json" \
  --variants "ac=none,compile=1" "ac=none,compile=1,fp8=1,fp8_recipe=tensorwise" \
  "ac=none,compile=1,fp8=1,fp8_recipe=rowwise_with_gw_hp" 2>&1 | grep "^{\|Error\|error" | cut -c1-400
python3 - "${OUT:-/tmp}/fp8_losses.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); ref = c.pop("ac=none,compile=1")
mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
for k, v in c.items():
    if v:  # last-50-step means and the worst 10-step window's relative gap to bf16
        gaps = [abs(mean(v[i:i + 10]) - mean(ref[i:i + 10])) / mean(ref[i:i + 10]) for i in range(0, len(v) - 9, 10)]
        print(k, f"bf16 {mean(ref[-50:]):.4f} fp8 {mean(v[-50:]):.4f} worst 10-step gap {max(gaps):.2%}")
PY
timeout 110 torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 --attn cudnn \
  --warmup 1 --steps 2 --phases --variants "ac=full,compile=1,offload=1" 2>&1 | grep "^{\|Error" | cut -c1-900
