#!/usr/bin/env bash
# Ninth GPU call (1 or 2 GPUs): adherence ablation v3 (#6). Since v2: one fp32 process trains without FSDP, TF32 matmuls,
# per-block compile (caches warmed while the data is made), noise drawn on the GPU, EMA 0.999 scored.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nproc; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 565 python3 bench/adherence_ablation.py --work /tmp/ablation --out "$OUT" --max-minutes ${MAX_MIN:-4.5} --num ${NUM:-48000} --chunks ${CHUNKS:-8} --batch ${BATCH:-128} 2>&1 \
  | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -40
cd /tmp/ablation && tar czf "$OUT/logs.tgz" *.log evals runs/*/metrics.jsonl 2>/dev/null
for f in train-baseline-s0 train-all-s0 warm0; do echo "== $f"; grep -v Loading $f.log | tail -4; done
