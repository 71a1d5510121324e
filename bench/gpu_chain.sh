#!/usr/bin/env bash
# #6 on 1 GPU, ~8 minutes per call: one stage of a run longer than a call. A stage trains the "all" arm's data
# without ITC, on fresh scenes (--data-seed STAGE), for STEPS (8,000) with a cosine decay, alone on the GPU with CUDA
# graphs. It starts from the previous stage's weights when the carried .chain/ holds them. It is scored (CFG 4, 50
# sampling steps), and its EMA transformer goes back in bf16 with its encoders as $OUT/warm.tar.NN. The parts are
# 15 MiB each, because a call returns at most 8 files of 16 MiB; a checkpoint with its optimizer state (~215 MB)
# can't come back.
#   first:    BIND=1 bash bench/gpu_wheels.sh                       here: .whl/ = the wheels + the T5 trained to bind
#   stage 1:  STAGE=1 bash bench/gpu_chain.sh                       carry [".whl"]
#   then:     bash bench/chain_prep.sh /work/.device/N              here: .chain/ = the wheels + that stage's parts
#             STAGE=2 bash bench/gpu_chain.sh                       carry [".chain"] (.whl + parts exceed 64 MiB)
# The stages are pieces of one cosine decay over STAGES × STEPS: stage k starts at the lr where stage k-1 ended and
# decays to the next piece's start (--optim.min_lr_ratio; each piece a half cosine between its ends), after a fresh
# optimizer's 200-step warm-up. The first chain (the eleventh session) restarted every stage at lr 1e-3 and lost
# half of what the last stage had learnt in its first 2,000 steps (79.7% → 35.9% on complex prompts). The last stage
# is scored with 3 eval seeds (3 × 64 complex renders: ±2.2 points at 90%), the others with one. Both chains so far
# (restarts, one decay) plateau near 80% with the small preset; PRESET=medium (1.5× the width, 40.0M) did not do
# better (fourteenth session). PRESET=deep (8 double blocks, 27.4M) passed +13.9 ± 5.5 points more complex prompts
# than small at 4,500 steps (seventeenth session, bench/gpu_depth.sh): the next chain. Its export (~54 MiB) still
# comes back as parts; with the wheels the parts are at the 64 MiB carry limit (FROM=warm needs no carry). RES=128
# is not measured (every stage of a chain with the same PRESET and RES; STAGES=1 is one run decayed to 0).
# FROM=warm: start from the weights the last call left in /tmp/warm-out of this still-warm machine (it stays warm
# ~30 s after a call, so issue the next call at once), for weights that can't come back (the medium preset's export
# is 79 MB, more than a call returns or carries) and to skip chain_prep.sh. RESTART=1: every stage its own cosine
# from LR to 0 (the eleventh session's schedule, 82.8%), so each stage's end is a finished run. Three back-to-back
# calls, carry [".whl"] each (~27 device minutes). BATCH=512 (LR scaled): 1.13x the samples/s of 256 on an H100,
# 1024: 1.24x (bench/gpu_speed.sh, twenty-first session).
# STAGE_EXTRA: trainer overrides of the stage, e.g. "--data.source synthetic --data.complex_frac 0.5
# --data.num_workers 8" (fresh scenes every step instead of the ~25,600 cached ones, each seen ~90 times a stage;
# bench/memorization.py found the base fits them no better than fresh ones); with it, NEXT_DATA=0 and ABL_AHEAD=0
# leave the CPU to the loader's workers (no scenes made ahead).
#   RESTART=1 STAGE=1 bash bench/gpu_chain.sh;  then FROM=warm RESTART=1 STAGE=2 …;  then FROM=warm RESTART=1 STAGE=3 …
set -u
STAGE=${STAGE:-1} STAGES=${STAGES:-3} PRESET=${PRESET:-small} RES=${RES:-64}
read -r LR MINR < <(python3 -c "import math; f=lambda k: .5*(1+math.cos(math.pi*k/$STAGES)); \
a, b = f($STAGE-1), f($STAGE); print(${LR:-1e-3}*a, b/a) if not ${RESTART:-0} else print(${LR:-1e-3}, 0.0)")
# a warm machine's last stage: its weights, runs and scores (its data folders are keyed by their seed: kept)
rm -rf /tmp/warm
if [ "${FROM:-}" = warm ]; then  # the last call's export, still on this machine if it stayed warm
  if [ "$(cat /tmp/warm-out/.stage 2>/dev/null)" != "$((STAGE - 1)) $PRESET $RES ${DATA:-complex_clean}" ]; then
    echo "FROM=warm: /tmp/warm-out holds '$(cat /tmp/warm-out/.stage 2>/dev/null)' (stage preset px data), stage $STAGE" \
      "needs '$((STAGE - 1)) $PRESET $RES ${DATA:-complex_clean}': the same PRESET, RES and DATA as that call, or the" \
      "machine was given back since it (rerun from stage 1)" >&2; exit 2
  fi
  mv /tmp/warm-out /tmp/warm && rm /tmp/warm/.stage
fi
rm -rf /tmp/warm-out /tmp/sweep/runs /tmp/sweep/evals /tmp/sweep/curve /tmp/sweep/train-*.log
if [ "${FROM:-}" = warm ]; then
  ENC=/tmp/warm INIT="--model.pretrained /tmp/warm"
elif [ "$STAGE" -gt 1 ]; then  # from the last stage's export, which chain_prep.sh put into .chain/ with its stage
  if [ "$(cat .chain/stage 2>/dev/null)" != "$((STAGE - 1))" ]; then
    echo "stage $STAGE needs stage $((STAGE - 1))'s weights, .chain/ holds stage '$(cat .chain/stage 2>/dev/null)'s:" \
      "run bench/chain_prep.sh on that stage's folder and carry [\".chain\"]" >&2; exit 2
  fi
  if [ -f .chain/shape ] && [ "$(cat .chain/shape)" != "$PRESET $RES" ]; then
    echo "stage $((STAGE - 1)) trained $(cat .chain/shape) (preset, px): run stage $STAGE with the same PRESET= and RES=," \
      "not $PRESET $RES" >&2; exit 2
  fi
  export WHEELS=.chain
  bash bench/chain_unpack.sh /tmp/warm || exit 1
  ENC=/tmp/warm INIT="--model.pretrained /tmp/warm"
else  # the T5 trained to bind: carried, or made on the machine
  ENC=$([ -d .whl/tiny-bind ] && echo "$PWD/.whl/tiny-bind" || echo bind) INIT=""
fi
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
echo "stage $STAGE of $STAGES from ${INIT:-random init}; encoders $ENC; lr $LR decaying to $MINR of it"
# Every stage is scored at CFG 4 with 50 sampling steps. The last one also under other guidance: the medium chain's
# failures were mostly one object too many in count prompts, and guidance at the high-noise steps, where the layout
# forms, is a suspect (--cfg-interval: guided only where σ ≤ 0.8 or ≤ 0.6), as is the scale (CFG 2).
LAST=$([ "$STAGE" = "$STAGES" ] && echo 1 || echo 0)  # the last stage: 3 eval seeds × 4 settings, fewer curve points
EV=("cfg4s50=--true-cfg 4 --steps 50")
# GUIDANCE=0: the last stage under CFG 4 alone (the fifteenth session found no lever in the others), and a shorter
# scoring reserve for it
((LAST && ${GUIDANCE:-1})) && EV+=("cfg4s50i08=--true-cfg 4 --steps 50 --cfg-interval 0 0.8"
  "cfg4s50i06=--true-cfg 4 --steps 50 --cfg-interval 0 0.6" "cfg2s50=--true-cfg 2 --steps 50")
# Not the last stage: the next stage's scenes (data seed + 1) are made on the CPU while this one trains, so that a
# FROM=warm stage finds them ready and trains ~100 s longer in its call (--next-data-seed).
# The last stage: the ablation's data sets (bench/gpu_ablation9.sh, BASE=warm next) are made and cached meanwhile,
# niced, with this chain's encoders (frozen through it), so that the ablation call trains ~80 s sooner (ABL_AHEAD=0:
# not).
if ((LAST)) && [ "${ABL_AHEAD:-1}" = 1 ] && [ -d "$ENC" ]; then
  DATA_ONLY=1 ENCODERS=$ENC LIMIT=540 nice -n 19 bash bench/gpu_ablation9.sh > /tmp/abl-ahead.log 2>&1 &
  AHEAD=$!
fi
# the sweep's deadline cuts the training clock so that scoring fits before this timeout (a medium stage once trained
# to the clock and lost its scores to it)
timeout 555 python3 bench/adherence_sweep.py --work /tmp/sweep --out "$OUT" --max-minutes ${MAX_MIN:-7.5} \
  --deadline-minutes ${DEADLINE_MIN:-9.0} --eval-reserve-s ${EVAL_RESERVE:-$((LAST ? (${GUIDANCE:-1} ? 120 : 90) : 60))} \
  $( ((LAST)) || [ "${NEXT_DATA:-1}" = 0 ] || echo --next-data-seed $((${DATA_SEED:-$STAGE} + 1)) ) \
  --num ${NUM:-32000} --chunks ${CHUNKS:-16} --data-seed ${DATA_SEED:-$STAGE} --cuda-graphs --batch ${BATCH:-256} \
  --preset $PRESET --resolution $RES --data ${DATA:-complex_clean} \
  --seeds ${SEED:-0} --encoders "$ENC" --steps ${STEPS:-8000} --schedule cosine --lr "$LR" --curve \
  --eval-seeds ${EVAL_SEEDS:-$( ((LAST)) && echo 0 1 2 || echo 0)} \
  --variants "stage$STAGE=$INIT ${STAGE_EXTRA:-} --optim.min_lr_ratio $MINR --checkpoint.interval ${CK_EVERY:-$((LAST ? 4000 : 2000))} --checkpoint.keep 10" \
  --evals "${EV[@]}" \
  2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -20
[ -n "${AHEAD:-}" ] && { wait "$AHEAD"; echo "the ablation's data, made ahead: $(grep -h "data ready" /tmp/abl-ahead.log ||
  echo "failed (/tmp/abl-ahead.log); the ablation call makes it")"; }
CK=$(ls -d /tmp/sweep/runs/*/checkpoints/step-* | tail -1)
python3 -m fluxtrain export --checkpoint "$CK" --format diffusers --out /tmp/warm-out --dtype bf16 2>&1 | tail -1
# parts back only where they fit beside the 4 other files a call returns (8 at most); FROM=warm reads the folder
if [ "$(du -sm /tmp/warm-out | cut -f1)" -le 60 ]; then tar cf - -C /tmp/warm-out . | split -b 15M -d - "$OUT/warm.tar."
else echo "the export ($(du -sh /tmp/warm-out | cut -f1)) stays on this machine: the next stage needs FROM=warm"; fi
# the stage, its shape and data: a chain keeps all three (gpu_ablation7.sh fine-tunes a base of simple_clean only)
echo "$STAGE $PRESET $RES ${DATA:-complex_clean}" > /tmp/warm-out/.stage
cd /tmp/sweep && tar czf "$OUT/logs.tgz" train-*.log runs/*/metrics.jsonl runs/*/config.toml evals/*.json \
  evals/*failures*.png curve/*.json 2>/dev/null
# one failure grid beside the parts: a call returns 8 files (the twelfth session's stage 3 had 3 grids, and its last
# part was left out)
cp /tmp/sweep/evals/*-cfg4s50-e0-failures.png "$OUT/" 2>/dev/null; ls -la "$OUT"
