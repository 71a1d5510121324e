#!/usr/bin/env bash
# #6, the ablation's v8: every arm fine-tunes a model that already follows complex prompts part of the time, the
# guide's own setting (FLUX.1-dev at 68% on complex prompts, fine-tuned to 89%). The base is a carried export: the
# fifteenth session's chain stage 2 (small preset, bound T5, 14,433 steps of clean complex-augmented data in two
# restarted stages; 68.8% complex, 89.1% simple over 3 eval seeds). v7 started from a base of clean simple prompts
# only (13.3% complex) and its "all" arm reached 36%.
#   here:   bash bench/chain_prep.sh /work/keep/chain15-stage2      .chain/ = the wheels + the base's parts (45 MB)
#   then:   SEED="0 1" bash bench/gpu_ablation8.sh                  carry [".chain"]; 405 s on 2 GPUs
# Fine-tuning lr 2.5e-4 → 0 over STEPS (v7's), all runs at once round-robin over the GPUs, a 5-minute guard each.
set -u
export WHEELS=.chain
B=${BASE_DIR:-/tmp/base}  # where the base is unpacked
rm -rf "$B"; bash bench/chain_unpack.sh "$B"; rc=$?
[ $rc = 3 ] && { echo "no .chain/base.pack or warm.tar.NN: run bench/chain_prep.sh on the base's folder" \
  "and carry [\".chain\"]" >&2; exit 2; }
[ $rc = 0 ] || exit 1
[ -f "$B/fluxtrain.json" ] || cp .chain/fluxtrain.json "$B/" 2>/dev/null || { echo "the base has no" \
  "fluxtrain.json (its T5 length): put the one of its run into the parts' folder and rerun bench/chain_prep.sh" >&2
  exit 2; }
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout ${LIMIT:-560} python3 bench/adherence_ablation.py --work /tmp/abl8 --out "$OUT" --base "$B" \
  --seeds ${SEED:-0 1} --lr ${LR:-2.5e-4} --steps ${STEPS:-1000} --max-minutes ${MAX_MIN:-5} --num ${NUM:-24000} \
  --chunks 16 --cuda-graphs --eval-seeds 0 1 ${EXTRA:-} 2>&1 \
  | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -24
cd /tmp/abl8 && tar czf "$OUT/logs.tgz" train-*.log eval-*.log runs/*/metrics.jsonl evals/*.json 2>/dev/null
cp /tmp/abl8/evals/all-s*-e0-failures.png "$OUT/" 2>/dev/null; ls -la "$OUT"
