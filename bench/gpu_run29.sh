#!/usr/bin/env bash
# #8, nvidia-h200-x4: optimizer offload after the re-read (one host buffer per unit, a GPU ring, the next step's
# copies in queued right after a step, FSDP's all-gather streams held until each block's update).
# (0) its CUDA tests: 1 GPU exactness with small and large rings, and 2 GPUs under FSDP/NCCL with the copies held
#     back, which must equal plain AdamW; then the same 2-GPU test with the all-gather wait removed, which must fail.
# (1) 12B, 4 GPUs, batch 4, op-SAC + compile + cuDNN op: offload with the least ring, 8 GiB, 16 GiB, then resident.
set -u
source bench/gpu_env.sh
python3 -m pytest -q -p no:cacheprovider tests/parallel/test_optimizer_offload.py 2>&1 | tail -6
ok=${PIPESTATUS[0]}
cp fluxtrain/parallel/optimizer_offload.py /tmp/oo.py
sed -i 's/for s in _gather_streams(m for m, _ in self.units):/for s in []:/' fluxtrain/parallel/optimizer_offload.py
echo "break check (must fail):"
python3 -m pytest -q -p no:cacheprovider tests/parallel/test_optimizer_offload.py -k all_gathers 2>&1 | grep -E "passed|failed|step [0-9]+:" | head -4
cp /tmp/oo.py fluxtrain/parallel/optimizer_offload.py
[ "$ok" = 0 ] || exit 1
V="ac=selective,ac_ops=1,compile=1"
timeout 400 torchrun --nproc_per_node 4 bench/train_step.py --preset flux-dev --resolution 1024 --batch 4 \
  --attn cudnn --warmup 2 --steps 5 --variants "$V,ooff=1" "$V,ooff=1,obuf=8" "$V,ooff=1,obuf=16" "$V" 2>&1 \
  | grep "^{\|Error\|error\|^| \|failed" | cut -c1-900
