#!/usr/bin/env bash
# #6, the ablation's v7 on one GPU (~8 minutes a call): every arm fine-tunes the model that the last gpu_chain.sh call
# left on this still-warm machine (/tmp/warm-out; the machine stays warm ~30 s after a call, so issue each call at
# once), the five arms of one seed at once on the GPU, ≤ 5 minutes each, scored beside the base's own score.
#   the base (clean simple prompts only):  DATA=simple_clean RESTART=1 STAGES=1 STAGE=1 bash bench/gpu_chain.sh
#   then:                                  SEED=0 bash bench/gpu_ablation7.sh;  then SEED=1 bash bench/gpu_ablation7.sh
#   (on 4 GPUs, one call: SEED="0 1" bash bench/gpu_ablation7.sh, the ten runs round-robin over the GPUs: sixteenth
#   session, 276 s; a second call on the warm machine starts every run afresh: adherence_ablation.fresh_runs)
#   here, the joint table:  python bench/adherence_ablation.py --merge /work/.device/N/ablation.json \
#                             /work/.device/M/ablation.json --out /tmp/v7
# All calls carry [".whl"]. The second call reuses the first one's data sets and caches (the same /tmp/abl7).
# Fine-tuning lr 2.5e-4: a restart at 1e-3 lost half of what a stage had learnt within 2,000 steps (eleventh
# session). STEPS: every arm's budget, the lr decaying to 0 over it; five runs share the GPU (~1,350 samples/s each
# at batch 128 in gpu_run36, ITC arms ~0.65x), so 1,000 steps of 256 should end inside the 5-minute guard.
set -u
BASE=${BASE:-/tmp/warm-out}
if [ ! -f "$BASE/model_index.json" ]; then
  echo "no exported base in $BASE: the machine was given back since the gpu_chain.sh call; run that call again" >&2
  exit 2
fi
if [ "$(cut -d' ' -f4 "$BASE/.stage" 2>/dev/null)" != simple_clean ]; then
  echo "the base in $BASE is '$(cat "$BASE/.stage" 2>/dev/null)' (stage preset px data), not simple_clean: v7 fine-tunes a model" \
    "that has seen only clean simple prompts (DATA=simple_clean bash bench/gpu_chain.sh)" >&2; exit 2
fi
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout ${LIMIT:-560} python3 bench/adherence_ablation.py --work /tmp/abl7 --out "$OUT" --base "$BASE" \
  --seeds ${SEED:-0} --lr ${LR:-2.5e-4} --steps ${STEPS:-1000} --max-minutes 5 --num ${NUM:-24000} --chunks 16 \
  --cuda-graphs --eval-seeds 0 1 2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -24
cd /tmp/abl7 && tar czf "$OUT/logs.tgz" train-*.log eval-*.log runs/*/metrics.jsonl evals/*.json 2>/dev/null
cp /tmp/abl7/evals/all-s*-e0-failures.png "$OUT/" 2>/dev/null; ls -la "$OUT"
