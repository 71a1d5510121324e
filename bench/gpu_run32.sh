#!/usr/bin/env bash
# #8: the 2-GPU offload worker (three offload optimizers in one process, the ring NaN-filled) after the fix: the copy
# streams wait for the compute stream once after the ring is allocated (gpu_run31: every offload optimizer after the
# first in a process went NaN at its first update: its ring reused memory with compute-stream work still queued).
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 170 torchrun --nproc_per_node 2 tests/parallel/offload_gpu_worker.py /tmp/w > "$OUT/worker.log" 2>&1
echo "worker rc $?"
python3 - <<'PY'
import json, pathlib
def losses(d):
    p = pathlib.Path("/tmp/w", d, "metrics.jsonl")
    return {r["step"]: r["loss"] for r in map(json.loads, p.read_text().splitlines()) if "event" not in r} if p.exists() else {}
ref = losses("plain")
for n in ("offload", "offload_ring", "offload_all"):
    got = losses(n)
    print(n, len(got), "steps; max rel diff vs plain:", max((abs(got[k] - ref[k]) / abs(ref[k]) for k in got if k in ref), default=None))
PY
