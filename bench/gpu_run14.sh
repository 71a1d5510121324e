#!/usr/bin/env bash
# Fourteenth GPU call (1 GPU): one small-preset run alone after the profile's two fixes: counter-based noise drawn in
# a few ops on the GPU (was 256 generator calls a step), and CUDA graphs per compiled block (compile_mode =
# reduce-overhead) against the default compiled mode.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
W=/tmp/solo
for c in 0 1 2 3; do python3 -m fluxtrain data synth --out $W/shards/p$c --num 500 --seed $((c + 1)) > /dev/null & done; wait
python3 -m fluxtrain cache --config configs/ablation-small.toml --out $W/cache --data.path "$W/shards/p*/*.tar" \
  --batch-size 256 2>&1 | tail -1
for m in reduce-overhead default; do
  timeout 72 python3 -m fluxtrain train --config configs/ablation-small.toml --data.source cache \
    --data.path $W/cache --train.batch_size 128 --train.steps 1000 --train.output_dir $W/run-$m --train.compile true \
    --train.compile_mode $m --log.interval 100 --checkpoint.interval 100000 --data.caption_dropout 0.1 \
    --ema.enabled true --ema.warmup true --ema.decay 0.995 2>&1 | grep "^step\|Error" | tail -4 | sed "s/^/$m: /"
done
