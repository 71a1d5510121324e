#!/usr/bin/env bash
# Eighth GPU call (1 GPU): why cuDNN attention, 1.8x faster than flash alone (attn_check), lost in the 12B run
# (block_probe: time and activation memory per block); where LoRA's extra resident bf16 copy comes from (memory
# allocated after init vs after the steps).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
F="UserWarning\|register_pre_backward\|output = self\|SyntaxWarning\|Configuration class\|torchao\|float32"
timeout 240 python3 bench/block_probe.py --double 1 --single 2 --batch 2 --variants flash,ops cudnn,ops flash,none \
  cudnn,none flash,ops,eager cudnn,ops,eager 2>&1 | grep -v "$F" | tee "$OUT/probe.log" | grep "^{"
timeout 200 torchrun --nproc_per_node 1 bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 --attn flash \
  --warmup 1 --steps 2 --variants "lora=16,ac=full" 2>&1 | grep -v "$F" > "$OUT/lora.log"; grep "^{" "$OUT/lora.log"
