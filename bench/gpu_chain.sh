#!/usr/bin/env bash
# #6 on 1 GPU, ~8 minutes per call: one stage of a run longer than a call. A stage trains the "all" arm's data
# without ITC, on fresh scenes (--data-seed STAGE), for STEPS (8,000) with a cosine decay, alone on the GPU with CUDA
# graphs. It starts from the previous stage's weights when the carried .chain/ holds them. It is scored (CFG 4, 50
# sampling steps), and its EMA transformer goes back in bf16 with its encoders as $OUT/warm.tar.NN. The parts are
# 15 MiB each, because a call returns at most 8 files of 16 MiB; a checkpoint with its optimizer state (~215 MB)
# can't come back.
#   stage 1:  STAGE=1 bash bench/gpu_chain.sh                       carry [".whl"] (the T5 trained to bind)
#   then:     bash bench/chain_prep.sh /work/.device/N              here: .chain/ = the wheels + that stage's parts
#             STAGE=2 bash bench/gpu_chain.sh                       carry [".chain"] (.whl + parts exceed 64 MiB)
set -u
STAGE=${STAGE:-1}
if ls .chain/warm.tar.* >/dev/null 2>&1; then
  export WHEELS=.chain
  mkdir -p /tmp/warm && cat .chain/warm.tar.* | tar xf - -C /tmp/warm || exit 1
  ENC=/tmp/warm INIT="--model.pretrained /tmp/warm"
elif [ "$STAGE" -gt 1 ]; then
  echo "stage $STAGE needs the last stage's weights: run bench/chain_prep.sh and carry [\".chain\"]" >&2; exit 2
else  # the T5 trained to bind: carried, or made on the machine
  ENC=$([ -d .whl/tiny-bind ] && echo "$PWD/.whl/tiny-bind" || echo bind) INIT=""
fi
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
echo "stage $STAGE from ${INIT:-random init}; encoders $ENC"
timeout 540 python3 bench/adherence_sweep.py --work /tmp/sweep --out "$OUT" --max-minutes ${MAX_MIN:-6.5} \
  --num ${NUM:-32000} --chunks ${CHUNKS:-16} --data-seed "$STAGE" --cuda-graphs --batch ${BATCH:-256} \
  --seeds ${SEED:-0} --encoders "$ENC" --steps ${STEPS:-8000} --schedule cosine --lr ${LR:-1e-3} --curve \
  --variants "stage$STAGE=$INIT --checkpoint.interval 2000 --checkpoint.keep 10" \
  --evals "cfg4s50=--true-cfg 4 --steps 50" \
  2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -20
CK=$(ls -d /tmp/sweep/runs/*/checkpoints/step-* | tail -1)
python3 -m fluxtrain export --checkpoint "$CK" --format diffusers --out /tmp/warm-out --dtype bf16 2>&1 | tail -1
tar cf - -C /tmp/warm-out . | split -b 15M -d - "$OUT/warm.tar."
cd /tmp/sweep && tar czf "$OUT/logs.tgz" train-*.log runs/*/metrics.jsonl runs/*/config.toml evals/*.json \
  curve/*.json 2>/dev/null
cp /tmp/sweep/evals/*failures*.png "$OUT/" 2>/dev/null; ls -la "$OUT"
