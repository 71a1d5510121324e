#!/usr/bin/env bash
# Tenth GPU call (1 GPU): (a) does cuDNN attention work in compiled blocks now that it goes through diffusers'
# _native_cudnn backend (contiguous q/k/v)? One process per variant (an illegal access poisons the context), run
# while the ablation makes its data; (b) adherence ablation v4 (#6): batch 512, EMA with decay warm-up.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
(for v in cudnn,ops flash,ops; do
   timeout 60 python3 bench/block_probe.py --double 1 --single 2 --batch 2 --variants $v 2>&1 | grep "^{" ; done \
   > "$OUT/probe.log") &
timeout 540 python3 bench/adherence_ablation.py --work /tmp/ablation --out "$OUT" --max-minutes ${MAX_MIN:-4.2} \
  --num ${NUM:-32000} --chunks ${CHUNKS:-14} --batch ${BATCH:-512} 2>&1 \
  | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -16
wait
echo "== probe"; cat "$OUT/probe.log"
cd /tmp/ablation && tar czf "$OUT/logs.tgz" train-*.log warm*.log evals/*.json runs/*/metrics.jsonl evals/baseline-s0-e0-failures.png evals/all-s0-e0-failures.png 2>/dev/null
for f in train-baseline-s0 train-all-s0; do echo "== $f"; grep -v Loading $f.log | tail -2; done
