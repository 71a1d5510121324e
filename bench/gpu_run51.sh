#!/usr/bin/env bash
# #8, carry [".whl"], ~7 minutes: fp8 `tensorwise_saved` against `tensorwise` and bf16, alternating in one launch.
# The ninth session's profile put fp8's loss in the casts (+76 ms of Triton work against −159 ms of GEMM time at the
# third depth on 2 GPUs); the largest share was the backward recasting each linear's input from bf16 (with op-level AC
# also the forward's cast, recomputed). tensorwise_saved keeps the forward's fp8 input for the weight gradient (CPU:
# bit-identical gradients, no input cast in the compiled backward; tests/parallel/test_fp8.py) at 1 byte per element
# of every linear input (the planner adds it). 1.2× bf16 is the goal; tensorwise gave 1.16-1.18×.
#   NGPU=1 (nvidia-h200): flux-dev's width at a third of its depth (6 + 12 blocks, 3.8B), batch 4;
#   NGPU=2 / 4: the 12B model, batch 2 / 4 per GPU (the configuration on 4).
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NGPU=${NGPU:-1}
case $NGPU in 1) SHAPE="--depth 6,12 --batch 4" ;; 2) SHAPE="--batch 2" ;; *) SHAPE="--batch 4" ;; esac
V="ac=selective,ac_ops=1,compile=1"
timeout ${LIMIT:-500} torchrun --nproc_per_node "$NGPU" bench/train_step.py --preset flux-dev --resolution 1024 $SHAPE \
  --attn cudnn --warmup 2 --steps 5 --variants "$V" "$V,fp8=1,fp8_recipe=tensorwise" \
  "$V,fp8=1,fp8_recipe=tensorwise_saved" "$V,rep=2" "$V,fp8=1,fp8_recipe=tensorwise_saved,rep=2" \
  > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep "^{\|Error\|error\|^| " "$OUT/bench.log" | cut -c1-1200
