#!/usr/bin/env bash
# Seventh GPU call (2 GPUs): the steady-state async-save stall with the one-block pinned stager (#4); is cuDNN
# attention correct and faster at FLUX's shape (#8); op-level SAC batch 2 with flash vs cuDNN attention (#8); then CPU
# offload with fused CPU AdamW (#8), in whatever time is left.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
F="UserWarning\|register_pre_backward\|output = self\|SyntaxWarning\|Configuration class\|torchao"
left() { echo $(( ${BUDGET:-580} - SECONDS )); }
timeout 200 torchrun --nproc_per_node 2 bench/checkpoint_io.py --preset flux-dev --run-dir /tmp/ckbench --repeats 2 \
  --staging background 2>&1 | grep -v "$F" > "$OUT/ckpt.log"
grep "^{\|Error" "$OUT/ckpt.log" | tail -6
rm -rf /tmp/ckbench
timeout 60 python3 bench/attn_check.py 2>&1 | grep -v "$F" | tee "$OUT/attn.log"
STEP=(bench/train_step.py --preset flux-dev --resolution 1024 --batch 2 --attn flash --warmup 2 --steps 4 --out "$OUT/results.md")
timeout $(( $(left) - 110 )) torchrun --nproc_per_node 2 "${STEP[@]}" \
  --variants "ac=selective,ac_ops=1,compile=1" "ac=selective,ac_ops=1,compile=1,attn=cudnn" 2>&1 | grep -v "$F" > "$OUT/step.log"
grep "^{" "$OUT/step.log"; grep -m2 -A6 "failed:" "$OUT/step.log" | head -20
timeout $(( $(left) - 5 )) torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 \
  --attn flash --warmup 1 --steps 1 --out "$OUT/results.md" --variants "ac=full,compile=1,offload=1" 2>&1 | grep -v "$F" > "$OUT/offload.log"
grep "^{" "$OUT/offload.log"; tail -3 "$OUT/offload.log"
cat "$OUT/results.md" 2>/dev/null
