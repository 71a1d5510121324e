#!/usr/bin/env bash
# Here, between two calls of bench/gpu_chain.sh: .chain/ (git-ignored through .git/info/exclude) gets the carried
# wheels that a stage needs (not the test, fp8 or encoder folders: .whl and the parts together exceed a call's
# 64 MiB) and, packed as base.pack, the warm.tar.NN parts that the last call returned to DIR.
set -eu
DIR=${1:?usage: bash bench/chain_prep.sh /work/.device/N, the folder holding the last stage parts warm.tar.NN}
ls "$DIR"/warm.tar.* >/dev/null 2>&1 || { echo "no warm.tar.NN parts in $DIR: give the last stage's folder" >&2
                                          exit 1; }
grep -qx "/.chain/" .git/info/exclude 2>/dev/null || echo "/.chain/" >> .git/info/exclude
rm -rf .chain && mkdir .chain
for w in .whl/*.whl; do
  case "$(basename "$w")" in torchao-*|pytest-*|pygments-*|iniconfig-*|pluggy-*) ;; *) cp "$w" .chain/ ;; esac
done
# packed (bench/weights_pack.py: the bf16 weights' exponent bytes compressed, 54 → 37 MiB for the deep preset): the
# parts as they came (~54 MiB) with the wheels and the tracked repo (~12 MiB) exceed a call's 64 MiB
T=$(mktemp -d) && cat "$DIR"/warm.tar.* | tar xf - -C "$T" && ${PYTHON:-python3} bench/weights_pack.py pack "$T" .chain/base.pack
rm -rf "$T"; [ -f .chain/base.pack ] || { echo "packing the parts of $DIR failed" >&2; exit 1; }
# what the base trained and samples with (its T5 length above all): exports before the sixteenth session lack it in
# their parts, and eval then samples with FLUX.1-dev's 512 tokens (0% on the v8 ablation's first base row)
for f in "$DIR/fluxtrain.json" "$DIR/export/fluxtrain.json"; do
  [ -f "$f" ] && cp "$f" .chain/fluxtrain.json && break
done
# the stage these weights end (its sweep's variant is stageN): gpu_chain.sh runs only the next one from them
python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['rows'][0]['variant'].removeprefix('stage'))" \
  "$DIR/sweep.json" > .chain/stage
# and the model and side it trained at: the next stage must use the same (gpu_chain.sh's PRESET and RES)
python3 -c "import json, sys; a = json.load(open(sys.argv[1]))['args']; print(a['preset'], a['resolution'])" \
  "$DIR/sweep.json" > .chain/shape
echo "stage $(cat .chain/stage)'s weights ($(cat .chain/shape))"; du -sh .chain
