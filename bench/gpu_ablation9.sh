#!/usr/bin/env bash
# #6, the ablation from v9 on: the five arms (× SEED) fine-tune a base that BASE names, so that one script serves
# every base (v7 and v8 each had a copy of this with its own base source):
#   BASE=warm   the export that the last bench/gpu_chain.sh call left on this still-warm machine (/tmp/warm-out; the
#               machine stays warm ~30 s after a call, so issue this call at once): a chain and its ablation in one
#               session, no weights carried
#   BASE=chain  the parts that bench/chain_prep.sh put into .chain/ from a stage's returned folder (carry [".chain"])
#   one GPU:   SEED=0 bash bench/gpu_ablation9.sh      (the five arms of one seed at once; a call per seed)
#   2+ GPUs:   SEED="0 1" bash bench/gpu_ablation9.sh  (all runs at once, round-robin over the GPUs)
# Fine-tuning lr LR (default 1e-4) → 0 over STEPS (1,000), a 5-minute guard per run (MAX_MIN). v8 fine-tuned at
# 2.5e-4 and every arm ended below its base; a gentler lr keeps more of it.
# DATA_ONLY=1 ENCODERS=DIR: the arms' data sets made and cached, nothing trained: gpu_chain.sh's last stage starts
# this in the background (niced), so that the ablation call after it finds them (v9's first call spent 80 s on them).
# The encoders are the chain's, frozen through it: the base's own.
set -u
B=${BASE_DIR:-/tmp/base}  # where the base is unpacked or moved
if [ "${DATA_ONLY:-0}" = 1 ]; then
  [ -f "${ENCODERS:-}/model_index.json" ] || { echo "DATA_ONLY=1 needs ENCODERS=<a folder with the base's text" \
    "encoders and VAE> (got '${ENCODERS:-}')" >&2; exit 2; }
  MODEL=(--encoders "$ENCODERS" --data-only) OUT=${OUT_AHEAD:-/tmp/abl-ahead}
else
case "${BASE:-}" in
  warm)
    W=${WARM_DIR:-/tmp/warm-out}
    [ -f "$W/model_index.json" ] || { echo "BASE=warm: no export in $W (the machine was given back since the" \
      "gpu_chain.sh call, or none ran on it): rerun that call, or BASE=chain with its returned parts" >&2; exit 2; }
    echo "base: the warm machine's last stage ($(cat "$W/.stage" 2>/dev/null || echo '?'): stage preset px data)"
    rm -rf "$B" && mkdir -p "$(dirname "$B")" && cp -r "$W" "$B" ;;
  chain)
    export WHEELS=.chain
    rm -rf "$B"; bash bench/chain_unpack.sh "$B"; rc=$?
    [ $rc = 3 ] && { echo "BASE=chain: no .chain/base.pack or warm.tar.NN: run bench/chain_prep.sh on the base's" \
      "folder and carry [\".chain\"]" >&2; exit 2; }
    [ $rc = 0 ] || exit 1
    echo "base: the carried stage $(cat .chain/stage 2>/dev/null) ($(cat .chain/shape 2>/dev/null))"
    [ -f "$B/fluxtrain.json" ] || cp .chain/fluxtrain.json "$B/" 2>/dev/null ;;
  *) echo "BASE=${BASE:-} : give BASE=warm (the last gpu_chain.sh call's export on this warm machine) or BASE=chain" \
       "(the parts in .chain/)" >&2; exit 2 ;;
esac
# its T5 length above all: without the file eval samples at FLUX.1-dev's 512 tokens (v8's base row scored 0%)
[ -f "$B/fluxtrain.json" ] || { echo "the base has no fluxtrain.json (its T5 length): put the one of its run into" \
  "the parts' folder and rerun bench/chain_prep.sh" >&2; exit 2; }
rm -f "$B/.stage"
MODEL=(--base "$B")
fi
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout ${LIMIT:-560} python3 bench/adherence_ablation.py --work ${ABL_WORK:-/tmp/abl} --out "$OUT" "${MODEL[@]}" \
  --seeds ${SEED:-0} --lr ${LR:-1e-4} --steps ${STEPS:-1000} --max-minutes ${MAX_MIN:-5} --num ${NUM:-24000} \
  --chunks 16 --cuda-graphs --eval-seeds ${EVAL_SEEDS:-0 1} ${EXTRA:-} 2>&1 \
  | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -24
RC=${PIPESTATUS[0]}
[ "${DATA_ONLY:-0}" = 1 ] && exit "$RC"
# Stopped by LIMIT (or failed) before its table, as the twentieth session's seed-0 call was while scoring: the table
# of the runs and scores it left, so that no finished score is lost
if [ "$RC" != 0 ] && [ ! -f "$OUT/ablation.json" ]; then
  echo "the ablation stopped (rc $RC) before its table: the table of what it scored"
  python3 bench/adherence_ablation.py --table-only --work ${ABL_WORK:-/tmp/abl} --out "$OUT" "${MODEL[@]}" \
    --seeds ${SEED:-0} --eval-seeds ${EVAL_SEEDS:-0 1} ${EXTRA:-} 2>&1 | tail -12
fi
cd ${ABL_WORK:-/tmp/abl} && tar czf "$OUT/logs.tgz" train-*.log eval-*.log runs/*/metrics.jsonl evals/*.json 2>/dev/null
cp ${ABL_WORK:-/tmp/abl}/evals/all-s*-e0-failures.png "$OUT/" 2>/dev/null; ls -la "$OUT"
