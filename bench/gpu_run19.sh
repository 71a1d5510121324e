#!/usr/bin/env bash
# Nineteenth GPU call (1 GPU): (1) the cuDNN op's GPU test (vs softmax attention at 512, 80 and 200 tokens);
# (2) the trainer with attention_backend = auto (cuDNN on Hopper) vs flash: tiny preset, bf16, compiled, 150 steps;
# (3) compile_mode = reduce-overhead without gradient accumulation on the same tiny config (with grad_accum 2 it failed).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_cudnn_attention.py 2>&1 | tail -3
T="python3 -m fluxtrain train --config configs/tiny.toml --train.device cuda --log.trackers [\"jsonl\"] --log.progress none
   --checkpoint.interval 1000 --checkpoint.resume never"
for a in auto flash; do
  timeout 110 $T --parallel.mixed_precision bf16 --train.compile true --model.attention_backend $a --train.steps 150 \
    --train.batch_size 32 --train.output_dir /tmp/tr-$a --log.interval 10 > $OUT/tr-$a.log 2>&1
  grep -i "attention" $OUT/tr-$a.log | head -2
done
timeout 90 $T --parallel.mixed_precision fp32 --train.compile true --train.compile_mode reduce-overhead --train.steps 40 \
  --train.batch_size 12 --train.output_dir /tmp/ro --log.interval 1 > $OUT/ro.log 2>&1; echo "reduce-overhead, grad_accum 1: rc $?"
python3 - <<'PY'
import json
for d in ("/tmp/tr-auto", "/tmp/tr-flash", "/tmp/ro"):
    try:
        L = [json.loads(l)["loss"] for l in open(f"{d}/metrics.jsonl") if '"loss"' in l]
    except OSError as e:
        L = [str(e)]
    print(d, len(L), [round(x, 4) if isinstance(x, float) else x for x in L[::3]])
PY
