#!/usr/bin/env bash
# #8 on 1 × H200 (nvidia-h200, 128 GiB host), carry [".whl"], ~8 minutes: gpu_run45's fp32-moments row, killed by the
# host in the call before (torch's pinned allocator rounded each block's moments up to a power of two: 152 GiB for
# 89), again with `fluxtrain.pinned.pinned_zeros` (exact bytes, cudaHostRegister); first its test and the other
# offload tests on the GPU, then fp32 and bf16 rows with the process's peak host memory (host_peak_gib).
set -u
source bench/gpu_env.sh
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_optimizer_offload.py 2>&1 | tail -3
ODTS="fp32 bf16" bash bench/gpu_run45.sh
