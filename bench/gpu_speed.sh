#!/usr/bin/env bash
# #6 on 1 GPU, ~5 minutes: the chain stage's training speed at larger batches, one variant at a time on one
# machine (bench/step_speed.py; a cache of 16,384 scenes, the deep preset, the T5 trained to bind, CUDA graphs).
# The stage ran 6,098 samples/s at batch 256 in fp32/TF32, 3.8% MFU (twentieth session): if the step were mostly
# host time, a larger batch would be nearly free. It is not: 512 gave 1.13x, 1024 1.24x (twenty-first session, H100;
# bench/RESULTS.md). Carry [".whl"].
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
ENC=$([ -d .whl/tiny-bind ] && echo "$PWD/.whl/tiny-bind" || echo "")
V=("fp32=" "b512=--train.batch_size 512" "b1024=--train.batch_size 1024")
# scenes drawn fresh every step (rendered by the loader's workers, encoded on the GPU) instead of the cache: a stage
# sees each of its ~25,600 cached scenes ~90 times, and the held-out prompts are captions it never saw. On an H100
# the loader gave 2,071 samples/s (168 ms of data wait a step): it rendered in the training process, whatever
# data.num_workers said. It now renders in the workers (not yet measured on a GPU).
[ -n "${SYNTH:-}" ] && V+=("synth-b512=--train.batch_size 512 --data.source synthetic --data.complex_frac 0.5 \
--data.num_workers ${SYNTH_WORKERS:-8}")
timeout ${LIMIT:-420} python3 bench/step_speed.py --work /tmp/speed --out "$OUT/step_speed.json" --preset ${PRESET:-deep} \
  ${ENC:+--encoders "$ENC"} --steps ${STEPS:-300} --log-interval ${LOG_EVERY:-50} --skip 2 ${SPEED_EXTRA:-} \
  --variants "${V[@]}" 2>&1 | grep -v "UserWarning\|warnings.warn"
tail -n 3 /tmp/speed/train-*.log
