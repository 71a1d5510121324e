#!/usr/bin/env bash
# #8, nvidia-h200-x4, after gpu_run29 and the first gpu_run30 (whose big-ring rows went NaN, and whose 2-GPU offload test failed with an NCCL error and no log kept):
# (0) the 2-GPU worker of that test alone, full log to $OUT, losses compared here;
# (1) 12B, 4 GPUs, batch 4, op-SAC + compile + cuDNN op: offload with a 16 GiB ring (first, a clean peak), 6 GiB, the least, then resident.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 170 torchrun --nproc_per_node 2 tests/parallel/offload_gpu_worker.py /tmp/w > "$OUT/worker.log" 2>&1
echo "worker rc $?"
grep -v "Loading weights\|UserWarning\|_register_pre_backward_hook\|^$" "$OUT/worker.log" | grep -B3 -A25 -m1 "Traceback" | cut -c1-300 | head -45
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
V="ac=selective,ac_ops=1,compile=1"
timeout 400 torchrun --nproc_per_node 4 bench/train_step.py --preset flux-dev --resolution 1024 --batch 4 \
  --attn cudnn --warmup 2 --steps 5 --variants "$V,ooff=1,obuf=16" "$V,ooff=1,obuf=6" "$V,ooff=1" "$V" > "$OUT/bench.log" 2>&1
grep "^{\|Error\|error\|^| \|failed" "$OUT/bench.log" | cut -c1-900
