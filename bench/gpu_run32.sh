#!/usr/bin/env bash
# #8: the 2-GPU offload worker (three offload optimizers in one process; each ring reuses a temporary whose NaN fill
# is still queued on the compute stream, then is NaN-filled on the copy stream) after the fix (the copy streams wait
# once for the compute stream after the ring is allocated; gpu_run31: every offload optimizer after the first in a
# process went NaN at its first update), then once more with that wait removed, which must go NaN.
set -u
source bench/gpu_env.sh
check() {
  timeout 100 torchrun --nproc_per_node 2 tests/parallel/offload_gpu_worker.py /tmp/w$1 > /tmp/worker$1.log 2>&1
  echo "worker rc $?"; grep -m2 "ring reuses" /tmp/worker$1.log
  python3 - $1 <<'PY'
import json, pathlib, sys
def losses(d):
    p = pathlib.Path(f"/tmp/w{sys.argv[1]}", d, "metrics.jsonl")
    return {r["step"]: r["loss"] for r in map(json.loads, p.read_text().splitlines()) if "event" not in r} if p.exists() else {}
ref = losses("plain")
for n in ("offload", "offload_ring", "offload_all"):
    got = losses(n)
    print(n, len(got), "steps; max rel diff vs plain:", max((abs(got[k] - ref[k]) / abs(ref[k]) for k in got if k in ref), default=None))
PY
}
check 1
sed -i 's/                s.wait_event(allocated)/                pass/' fluxtrain/parallel/optimizer_offload.py
echo "without the wait (must differ):"; check 2
