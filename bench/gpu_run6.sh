#!/usr/bin/env bash
# Sixth GPU call (2 GPUs): async-save stall with kept pinned buffers (#4), the 12B export time (#4), then the
# adherence ablation v2 (#6: cached latents, caption dropout + classifier-free guidance, the retrained VAE).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
F="UserWarning\|register_pre_backward\|output = self\|SyntaxWarning\|Configuration class\|torchao"
W=/tmp/ablation
( python3 bench/adherence_ablation.py --work $W --out "$OUT" --data-only > "$OUT/data.log" 2>&1 ) &
timeout 170 torchrun --nproc_per_node 2 bench/checkpoint_io.py --preset flux-dev --run-dir /tmp/ckbench --repeats 2 \
  --staging background 2>&1 | grep -v "$F" > "$OUT/ckpt.log"
grep "^{\|Error" "$OUT/ckpt.log" | tail -6
rm -rf /tmp/ckbench
wait
tail -1 "$OUT/data.log"
timeout 130 python3 bench/export_time.py --preset flux-dev --work /tmp/xb --out /dev/shm/xb --formats diffusers \
  --threads 8 2>&1 | grep -v "$F" | tee "$OUT/export.log"
rm -rf /tmp/xb /dev/shm/xb
python3 bench/adherence_ablation.py --work $W --out "$OUT" --max-minutes "${MAX_MIN:-3}" 2>&1 | grep -v Warn | tail -16
tar -C "$W" -czf "$OUT/runs.tgz" --exclude='*.distcp' --exclude='*.safetensors' runs evals 2>/dev/null; true
