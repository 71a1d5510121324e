#!/usr/bin/env bash
# Twenty-fourth GPU call (2 GPUs; the 4-GPU kind was withdrawn after gpu_run23), #8: (1) the tensorwise fp8 recipes
# without torchao's fp8 all-gather weight subclass (with it, inductor refused the graph: "output aliasing ... with
# subclass outputs"), on the block probe; (2) the 12B bf16 vs the fastest fp8 recipe that built with gradients within
# 2% of bf16's, op-SAC batch 2 on 2 GPUs, one launch; (3) the 12B CPU-offload step split into forward+backward and
# clip+optimizer (it took 14.3 s vs 1.16 s resident in gpu_run23).
set -u
source bench/gpu_env.sh
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/block_probe.py --double 1 --single 2 --batch 2 --steps 3 \
  --variants cudnn,ops cudnn,ops,fp8=tensorwise,noag cudnn,ops,fp8=tensorwise_gw_hp,noag \
  cudnn,ops,fp8=rowwise_with_gw_hp >/tmp/probe.jsonl 2>/tmp/probe.err
grep "^{" /tmp/probe.jsonl
grep -i -A6 "raised" /tmp/probe.err | grep -v "^\s*$" | cut -c1-300 | head -24
V=$(python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/probe.jsonl") if l.startswith("{")]
ok = [r for r in rows if r.get("fp8") and r.get("finite") and r.get("grad_rel_err", 1) < 0.02]
best = min(ok, key=lambda r: r["fwd_bwd_s"]) if ok else None
print(f"fp8=1,fp8_recipe={best['fp8']},fp8_ag={int(best['fp8_all_gather'])}" if best else "")
PY
)
echo "fp8 variant for the 12B run: ${V:-none}"
[ -n "$V" ] && timeout ${FLIMIT:-230} torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev \
  --resolution 1024 --batch 2 --attn cudnn --warmup 2 --steps 3 --variants "ac=selective,ac_ops=1,compile=1" \
  "ac=selective,ac_ops=1,compile=1,$V" 2>&1 | grep "^{\|Error\|error\|^| " | cut -c1-700 | head -12
timeout ${OLIMIT:-150} torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 \
  --attn cudnn --warmup 1 --steps 2 --phases --variants "ac=full,compile=1,offload=1" 2>&1 \
  | grep "^{\|Error\|error" | cut -c1-900 | head -5
