#!/usr/bin/env bash
# First GPU call: environment check, then the flux-dev step benchmark (eager variants + one compiled).
set -u
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF-expandable_segments:True} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
python3 -c "import torch, diffusers, transformers, torchao; print(torch.__version__, diffusers.__version__, transformers.__version__, torchao.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))"
nvidia-smi topo -m | head -8
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
timeout ${BENCH_TIMEOUT:-420} torchrun --nproc_per_node "$N" bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 \
  --attn flash --warmup 2 --steps 5 --out "$OUT/results.md" --variants ${VARIANTS:-"ac=full" "ac=selective,ac_every=2" "ac=none" "ac=none,compile=1"} 2>&1 | grep -v "UserWarning\|register_pre_backward\|output = self" | tee "$OUT/bench.log"
