#!/usr/bin/env bash
# Thirteenth GPU call (1 GPU): where the 60 ms step of one small-preset run alone goes (host-bound: 2x the batch
# adds 8 ms). torch.profiler traces of steps 150-152, compiled and eager, cached latents, batch 128.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/solo
for c in 0 1 2 3 4 5 6 7; do python3 -m fluxtrain data synth --out $W/shards/p$c --num 500 --seed $((c + 1)) > /dev/null & done; wait
python3 -m fluxtrain cache --config configs/ablation-small.toml --out $W/cache --data.path "$W/shards/p*/*.tar" \
  --batch-size 256 2>&1 | tail -1
for c in true false; do
  timeout 150 python3 -m fluxtrain train --config configs/ablation-small.toml --data.source cache \
    --data.path $W/cache --train.batch_size 128 --train.steps 160 --train.output_dir $W/run-$c --train.compile $c \
    --log.interval 50 --checkpoint.interval 100000 --data.caption_dropout 0.1 --ema.enabled true --ema.warmup true \
    --ema.decay 0.995 --log.profile_steps '[150, 152]' 2>&1 | grep "^step" | sed "s/^/compile $c: /"
  cp $W/run-$c/profile/trace-*.json.gz "$OUT/trace-compile-$c.json.gz"
done
ls -la "$OUT"
