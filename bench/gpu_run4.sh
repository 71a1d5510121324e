#!/usr/bin/env bash
# Fourth GPU call: 12B checkpoint stall + export time, then offload and fp8 variants beside the best bf16 one.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
timeout 120 torchrun --nproc_per_node "$N" bench/checkpoint_io.py --preset flux-dev --run-dir /tmp/ckbench 2>&1 | grep "^{\|Error" | tee "$OUT/ckpt.txt"
( time timeout 120 python3 -m fluxtrain export --checkpoint /tmp/ckbench/checkpoints/step-00000001 --format diffusers --out /tmp/export ) 2>&1 | grep -v Warn | tail -4 | tee -a "$OUT/ckpt.txt"
du -sh /tmp/export/transformer 2>&1 | tee -a "$OUT/ckpt.txt"
rm -rf /tmp/ckbench /tmp/export
timeout 300 torchrun --nproc_per_node "$N" bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 --attn flash \
  --warmup 2 --steps 4 --out "$OUT/results.md" --variants $VARIANTS 2>&1 | grep -v "UserWarning\|register_pre_backward\|output = self\|SyntaxWarning\|Configuration class" > "$OUT/bench.log"
grep "^{\|^|" "$OUT/bench.log"; grep -m3 -A12 "failed:" "$OUT/bench.log" | head -60
