#!/usr/bin/env bash
# #8, 1 × H200, carry [".whl"], ~5 minutes: why the compute stream ran ~5 steps ahead of the offloaded optimizer's
# copies in gpu_run49 (12B fp32 moments on one GPU: median 0.975 s per step synced on the compute stream, 2.806 s with
# every stream drained). 8 timed steps, then 2 profiled ones; from the trace: each copy kind's count, bytes, busy time
# and bandwidth, and each stream's busy time, to see which stream sets the pace and whether the copies wait.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
V="ac=selective,ac_ops=1,compile=1,ooff=1,obuf=16,odt=${ODT:-fp32}"
timeout 400 torchrun --nproc_per_node 1 bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 \
  --attn cudnn --warmup 2 --steps 8 --profile "$OUT/prof" --variants "$V" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep "^{\|Error\|error" "$OUT/bench.log" | cut -c1-1500
python3 - "$OUT"/prof/*.json.gz <<'PY'
import collections, gzip, json, sys
ev = json.load(gzip.open(sys.argv[1]))["traceEvents"]
copies, streams = collections.defaultdict(lambda: [0, 0, 0.0]), collections.defaultdict(float)
for e in ev:
    if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
        continue
    streams[e.get("args", {}).get("stream")] += e["dur"] / 1e3
    if e["cat"] == "gpu_memcpy":
        c = copies[e["name"]]
        c[0] += 1; c[1] += e.get("args", {}).get("bytes", 0); c[2] += e["dur"] / 1e3
for name, (n, b, ms) in sorted(copies.items(), key=lambda kv: -kv[1][1]):
    print(f"{name}: {n} copies, {b / 1e9:.1f} GB, {ms:.0f} ms busy, {b / 1e6 / max(ms, 1e-9):.1f} GB/s")
for s, ms in sorted(streams.items(), key=lambda kv: -kv[1]):
    print(f"stream {s}: {ms:.0f} ms busy over the 2 profiled steps")
PY
ls -la "$OUT"/prof
