#!/usr/bin/env bash
# #8 on 2 × H200 (nvidia-h200-x2), ~9.5 minutes, carry [".whl"]:
# (0) the optimizer-offload tests on 2 GPUs, now with bf16 moments under NCCL and held-back copies;
# (1) 12B, batch 2/GPU: resident, then AdamW's moments offloaded in bf16 (16 GiB ring), one launch: the offload's cost
#     as a same-launch ratio, and what an earlier variant leaves allocated (the holder diagnostic prints);
# (2) 12B, batch 4/GPU with bf16 moments offloaded: what the freed memory enables (resident batch 4 needs ~153 GiB);
# (3) the same with fp8 tensorwise linears, if time is left.
# Each part gets what is left of a 575 s budget.
# Thirteenth session: run as is (commit 9d39255). For the next 2-GPU call, with the drained-stream timing
# (wall_step_s, 8 timed steps) and where the resident row's leftover was allocated:
#   STEPS=8 B2_FLAGS=--memory-history bash bench/gpu_run46.sh
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
left() { local l=$((575 - SECONDS)); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
timeout "$(left 130)" python3 -m pytest -q -p no:cacheprovider tests/parallel/test_optimizer_offload.py 2>&1 | tail -4
V="ac=selective,ac_ops=1,compile=1"
run() {  # name, batch, time cap, variants...
  local name=$1 batch=$2 cap; cap=$(left "$3"); shift 3
  [ "$cap" -gt 60 ] || { echo "$name: skipped, ${cap}s left"; return; }
  timeout "$cap" torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch "$batch" \
    --attn cudnn --warmup 2 --steps "${STEPS:-4}" ${FLAGS:-} --variants "$@" > "$OUT/bench-$name.log" 2>&1
  echo "== $name rc=$? at ${SECONDS}s"
  grep "^{\|Error\|error\|^| \|failed\|left allocated\|held by\|allocated at\|  " "$OUT/bench-$name.log" | grep -v Warning | cut -c1-900 | head -40
}
FLAGS=${B2_FLAGS:-} run b2 2 210 "$V" "$V,ooff=1,odt=bf16,obuf=16"
run b4 4 150 "$V,ooff=1,odt=bf16,obuf=16"
run b4fp8 4 150 "$V,ooff=1,odt=bf16,obuf=16,fp8=1"
