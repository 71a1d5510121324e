#!/usr/bin/env bash
# Twenty-third GPU call (4 GPUs), #8: (1) GPU 3: which fp8 recipes build under compile with op-SAC in the real block
# (block probe; inductor's full cause printed), alongside (2) GPUs 0,1: the 12B CPU offload with each rank's share of
# the cores (parallel.cpu_threads auto; was 19.9 s/step on one core) vs the same config resident, and what offload
# enables (op-SAC batch 4 on 2 GPUs); then (3) 4 GPUs: bf16 vs the fastest fp8 recipe that built with gradients
# within 2% of bf16's, op-SAC batch 4 (run22's 46.4% configuration), one launch.
set -u
source bench/gpu_env.sh
(CUDA_VISIBLE_DEVICES=3 timeout 230 python3 bench/block_probe.py --double 1 --single 2 --batch 2 --steps 3 \
  --variants cudnn,ops cudnn,ops,fp8=tensorwise_gw_hp cudnn,ops,fp8=rowwise_with_gw_hp cudnn,ops,fp8=rowwise \
  cudnn,ops,fp8=tensorwise >/tmp/probe.jsonl 2>/tmp/probe.err) &
CUDA_VISIBLE_DEVICES=0,1 timeout ${OLIMIT:-260} torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev \
  --resolution 1024 --batch 1 --attn cudnn --warmup 1 --steps 2 --variants "ac=full,compile=1" \
  "ac=full,compile=1,offload=1" "ac=selective,ac_ops=1,compile=1,offload=1,batch=4" 2>&1 \
  | grep "^{\|Error\|error\|^| " | cut -c1-700 | head -12
wait
grep "^{" /tmp/probe.jsonl
grep -i -B2 -A8 "raised\|assert\|row_major\|Error:" /tmp/probe.err | grep -v "^\s*$" | cut -c1-300 | head -40
R=$(python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/probe.jsonl") if l.startswith("{")]
ok = [r for r in rows if r.get("fp8") and r.get("finite") and r.get("grad_rel_err", 1) < 0.02]
print(min(ok, key=lambda r: r["fwd_bwd_s"])["fp8"] if ok else "")
PY
)
echo "fp8 recipe for the 12B run: ${R:-none}"
[ -n "$R" ] && timeout ${FLIMIT:-230} torchrun --nproc_per_node 4 bench/train_step.py --preset flux-dev \
  --resolution 1024 --batch 4 --attn cudnn --warmup 2 --steps 3 --variants "ac=selective,ac_ops=1,compile=1" \
  "ac=selective,ac_ops=1,compile=1,fp8=1,fp8_recipe=$R" 2>&1 | grep "^{\|Error\|error\|^| " | cut -c1-700 | head -12
