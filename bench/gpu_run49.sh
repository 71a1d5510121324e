#!/usr/bin/env bash
# #8, 1 × H200, carry [".whl"], ~4 minutes: gpu_run48's 12B one-GPU rows again with 8 timed steps and the bench's new
# wall_step_s (every stream drained at the end, so copies that ran past the compute stream's per-step sync count) and
# its count of skipped (non-finite) steps. gpu_run48's fp32 row (0.624 s) was faster than its bf16 row (1.025 s)
# although it moves twice the bytes: one of the two timings does not hold what the step costs.
set -u
source bench/gpu_env.sh
ODTS="fp32 bf16" STEPS=8 bash bench/gpu_run45.sh 2>&1 | grep -v "^  \|^fastest\|total  \|Mem:"
