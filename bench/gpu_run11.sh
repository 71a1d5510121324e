#!/usr/bin/env bash
# Eleventh GPU call (1 GPU): (a) how fast one ablation run trains with the GPU to itself (compiled, TF32, cached
# latents): the steps a 5-minute arm gets when arms don't share a GPU; (b) cuDNN attention in compiled blocks through
# diffusers' _native_cudnn backend, one process per variant (an illegal access poisons the context).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/solo
for c in 0 1 2 3 4 5 6 7; do python3 -m fluxtrain data synth --out $W/shards/p$c --num 1000 --noise-frac 0.2 \
  --seed $((c + 1)) > /dev/null & done; wait
python3 -m fluxtrain cache --config configs/ablation-small.toml --out $W/cache --data.path "$W/shards/p*/*.tar" \
  --batch-size 256 2>&1 | tail -1
for b in 256 128; do
  timeout ${SOLO_S:-75} python3 -m fluxtrain train --config configs/ablation-small.toml --data.source cache \
    --data.path $W/cache --train.batch_size $b --train.steps 100000 --train.output_dir $W/run$b --train.compile true \
    --log.interval 100 --checkpoint.interval 100000 2>&1 | grep "^step" | tail -3 | sed "s/^/batch $b: /"
done
for v in cudnn,ops flash,ops; do
  timeout 90 python3 bench/block_probe.py --double 1 --single 2 --batch 2 --variants $v 2>&1 | grep "^{\|Error" | tail -2
done
