#!/usr/bin/env bash
# Sixteenth GPU call (2 GPUs): (1) CUDA graphs with gradient accumulation — the tiny trainer with
# compile_mode = reduce-overhead vs default, grad_accum 2, same seed, one process per GPU: the losses must agree;
# (2) the 12B full fine-tune with cuDNN attention (diffusers' _native_cudnn) vs flash, op-level SAC + per-block
# compile, batch 2/GPU (the best configuration so far), same launch.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
g=0
for m in reduce-overhead default; do
  CUDA_VISIBLE_DEVICES=$g timeout 150 python3 -m fluxtrain train --config configs/tiny.toml --train.device cuda \
    --train.steps 40 --train.batch_size 12 --train.grad_accum 2 --train.compile true --train.compile_mode $m \
    --train.output_dir /tmp/accum-$m --log.interval 1 --log.trackers '["jsonl"]' --log.progress none \
    --checkpoint.interval 1000 --checkpoint.resume never > $OUT/accum-$m.log 2>&1 &
  g=$((g + 1))
done
wait
python3 - <<'PY'
import json
L = {m: [json.loads(l)["loss"] for l in open(f"/tmp/accum-{m}/metrics.jsonl") if '"loss"' in l]
     for m in ("reduce-overhead", "default")}
a, b = L["reduce-overhead"], L["default"]
print("accum steps", len(a), len(b), "max rel diff", max(abs(x - y) / abs(y) for x, y in zip(a, b)) if a and b else None)
print("reduce-overhead", [round(x, 4) for x in a[::8]]); print("default        ", [round(x, 4) for x in b[::8]])
PY
tail -3 $OUT/accum-*.log
timeout ${LIMIT:-400} torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 2 \
  --warmup 2 --steps 4 --variants "ac=selective,ac_ops=1,compile=1,attn=cudnn" "ac=selective,ac_ops=1,compile=1,attn=flash" \
  2>&1 | grep "^{\|Error\|error" | head -20
