#!/usr/bin/env bash
# GPU call for the adherence ablation (issue #6): retrain the tiny VAE on the GPU while the data sets are made, keep
# whichever VAE reconstructs scenes the checker passes more often, then run every arm × seed at once.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/ablation
( CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m fluxtrain.models.tiny --out /tmp/tiny-new --vae-steps "${VAE_STEPS:-4000}" \
    --batch 32 --device cuda --workers 6 --check 2>&1 | grep -v "Warn\|it/s" > "$OUT/vae.log" ) &
python3 bench/adherence_ablation.py --work $W --out "$OUT" --data-only 2>&1 | tail -3
wait
tail -4 "$OUT/vae.log"
ENC=$(python3 - <<'PY'
from fluxtrain.models.tiny import reconstruction_adherence, tiny_folder
old = reconstruction_adherence(tiny_folder())
try:
    new = reconstruction_adherence("/tmp/tiny-new")
except Exception as e:
    new = -1
import sys; print(f"VAE ceiling on complex scenes: shipped {old:.3f}, retrained {new:.3f}", file=sys.stderr)
print("/tmp/tiny-new" if new > old else tiny_folder())
PY
)
echo "encoders: $ENC" | tee -a "$OUT/vae.log"
[ "$ENC" = /tmp/tiny-new ] && mkdir -p "$OUT/vae" && cp /tmp/tiny-new/vae/* "$OUT/vae/"
python3 bench/adherence_ablation.py --work $W --out "$OUT" --encoders "$ENC" --max-minutes "${MAX_MIN:-4.5}" 2>&1 | grep -v Warn | tail -25
for f in "$W"/train-*.log; do echo "== $f"; grep -v "Warn\|hook" "$f" | tail -2; done | tail -40
for r in "$W"/runs/*; do
  n=$(basename "$r"); cp "$r/metrics.jsonl" "$OUT/$n-metrics.jsonl"; cp "$r"/samples/*.png "$OUT/$n-samples.png" 2>/dev/null
done
mkdir -p "$OUT/evals" && cp "$W"/evals/*.json "$OUT/evals/" 2>/dev/null; true
