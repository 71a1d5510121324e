#!/usr/bin/env bash
# Fifth GPU call (2 GPUs): LoRA rank-16 rows on 1 and 2 GPUs (#10), 12B export time (#4) and async-save stall with
# background staging vs synchronous (#4); the tiny VAE retrained on GPU 0 meanwhile (brought back as vae.tar).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
F="UserWarning\|register_pre_backward\|output = self\|SyntaxWarning\|Configuration class\|torchao"
STEP=(bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 --attn flash --warmup 2 --steps 4 --out "$OUT/results.md")
# phase 1, side by side: VAE on GPU 0, LoRA on GPU 1 alone, the export (CPU and disk only)
( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m fluxtrain.models.tiny --out /tmp/tiny-new --vae-steps 3000 --batch 32 \
    --device cuda --workers 6 --check 2>&1 | grep -v "Warn\|it/s" > "$OUT/vae.log"; tar -C /tmp/tiny-new -cf "$OUT/vae.tar" vae ) &
( timeout 200 python3 bench/export_time.py --preset flux-dev --work /tmp/xb --out /dev/shm/xb --formats diffusers,bfl \
    --threads 8 2>&1 | grep -v "$F" > "$OUT/export.log" ) &
CUDA_VISIBLE_DEVICES=1 timeout 190 torchrun --nproc_per_node 1 --master_port 29611 "${STEP[@]}" \
  --variants "lora=16,ac=none,compile=1" "lora=16,ac=full" 2>&1 | grep -v "$F" > "$OUT/lora1.log"
wait
grep "^{" "$OUT/lora1.log"; tail -3 "$OUT/vae.log"; cat "$OUT/export.log"
# phase 2: LoRA on both GPUs, then the checkpoint stall
timeout 130 torchrun --nproc_per_node 2 "${STEP[@]}" --variants "lora=16,ac=none,compile=1" 2>&1 | grep -v "$F" > "$OUT/lora2.log"
grep "^{" "$OUT/lora2.log"; grep -m2 -A8 "failed:" "$OUT"/lora*.log | head -30
timeout 170 torchrun --nproc_per_node 2 bench/checkpoint_io.py --preset flux-dev --run-dir /tmp/ckbench --repeats 1 2>&1 \
  | grep -v "$F" > "$OUT/ckpt.log"
grep "^{\|Error" "$OUT/ckpt.log" | tail -8
rm -rf /tmp/ckbench /tmp/xb /dev/shm/xb
