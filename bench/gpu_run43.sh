#!/usr/bin/env bash
# For the next 4-GPU call (#6): the ablation v6 with the T5 trained to bind (made on the machine), every arm trained
# for the same STEPS (default 5,000) with a cosine decay, batch 256, one run per GPU slot, CUDA graphs for the arms
# without ITC, scored with 50 sampling steps at CFG 4 (2 eval seeds). A run alone on an H200 does ~23 steps/s
# (ITC arms ~14), so on 4 GPUs it is two calls of ~9 minutes:
#   ARMS="baseline clean complex" RPG=2 bash bench/gpu_run43.sh    (6 runs; GPUs 0 and 1 hold two)
#   ARMS="itc all" RPG=1 bash bench/gpu_run43.sh                   (4 runs)
# then `python bench/adherence_ablation.py --merge A/ablation.json B/ablation.json --out DIR`. On 2 GPUs, halve STEPS
# or split the arms over more calls; the table states the steps every run reached.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 575 python3 bench/adherence_ablation.py --work /tmp/ablation --out "$OUT" --steps ${STEPS:-5000} \
  --max-minutes ${MAX_MIN:-7.5} --num ${NUM:-32000} --chunks ${CHUNKS:-16} --runs-per-gpu ${RPG:-1} --cuda-graphs \
  --arms ${ARMS:-baseline clean complex itc all} 2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -16
cd /tmp/ablation && tar czf "$OUT/logs.tgz" train-*.log warm*.log evals/*.json runs/*/metrics.jsonl 2>/dev/null
