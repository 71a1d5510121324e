#!/usr/bin/env bash
# For the next GPU call (#8): the optimizer-offload GPU tests as they stand after the eighth session (not all run on a
# GPU yet: the round trip with a ring holding every unit, and the 2-GPU worker with the queued-fill hazard ran only
# as gpu_run32's script). ~2 minutes on 2+ GPUs. Then, with the device time left, the #6 ablation (bench/gpu_run15.sh).
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pytest -q -p no:cacheprovider tests/parallel/test_optimizer_offload.py > "$OUT/offload_tests.log" 2>&1
tail -3 "$OUT/offload_tests.log"
