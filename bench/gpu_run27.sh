#!/usr/bin/env bash
# #8, on nvidia-h200-x4: (1) gpu_run26 put fp8 tensorwise at 1.619 s against bf16 at 2.406 s in one launch (1.49x),
# but that bf16 row was 25% slower than gpu_run23's 1.930 s, so this launch alternates bf16 / tensorwise / bf16 /
# tensorwise over 5 timed steps each, with every step's time in its row; (2) fp8 numerics over 300 steps (gpu_run26's
# ran past its timeout): flux-dev width, 2 double + 4 single blocks, one GPU per variant, side by side.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp}
V="ac=selective,ac_ops=1,compile=1"
timeout 380 torchrun --nproc_per_node 4 bench/train_step.py --preset flux-dev --resolution 1024 --batch 4 \
  --attn cudnn --warmup 2 --steps 5 --variants "$V" "$V,fp8=1,fp8_recipe=tensorwise" "$V,rep=2" \
  "$V,fp8=1,fp8_recipe=tensorwise,rep=2" 2>&1 | grep "^{\|Error\|error\|^| \|failed" | cut -c1-900
N="--preset flux-dev --depth 2,4 --resolution 512 --batch 4 --attn cudnn --warmup 0 --steps 300"
CUDA_VISIBLE_DEVICES=0 timeout 170 torchrun --nproc_per_node 1 --master_port 29510 bench/train_step.py $N \
  --losses "$OUT/losses_bf16.json" --variants "ac=none,compile=1" > "$OUT/n0.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 170 torchrun --nproc_per_node 1 --master_port 29511 bench/train_step.py $N \
  --losses "$OUT/losses_fp8.json" --variants "ac=none,compile=1,fp8=1,fp8_recipe=tensorwise" > "$OUT/n1.log" 2>&1 &
wait
grep -h "^{\|Error" "$OUT/n0.log" "$OUT/n1.log" | cut -c1-500
python3 - "$OUT/losses_bf16.json" "$OUT/losses_fp8.json" <<'PY'
import json, sys
ref = next(iter(json.load(open(sys.argv[1])).values())); v = next(iter(json.load(open(sys.argv[2])).values()))
mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
gaps = [abs(mean(v[i:i + 10]) - mean(ref[i:i + 10])) / mean(ref[i:i + 10]) for i in range(0, len(v) - 9, 10)]
print(f"{len(v)} steps: last-50 mean bf16 {mean(ref[-50:]):.4f} fp8 {mean(v[-50:]):.4f}, worst 10-step gap "
      f"{max(gaps):.2%}, mean 10-step gap {mean(gaps):.2%}")
PY
