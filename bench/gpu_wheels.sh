#!/usr/bin/env bash
# Here, once per fresh checkout, before GPU calls: .whl/ (git-ignored) gets the wheels the GPU image lacks, at the
# versions this venv runs (diffusers, webdataset, pydantic and their needs; torchao for fp8 with FP8=1) and, with
# BIND=1, the tiny folder with its T5 trained to bind (.whl/tiny-bind, 4.5 minutes on 2 cores; bench/gpu_chain.sh
# otherwise makes it on the GPU machine). Carry [".whl"] in the calls.
set -eu
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
PIP=.venv/bin/pip
[ -x "$PIP" ] || { echo "no .venv: run 'make install' first" >&2; exit 1; }
pkgs=(diffusers webdataset braceexpand pydantic pydantic_core annotated-types typing-inspection tomli_w
      importlib_metadata)
[ "${FP8:-0}" = 1 ] && pkgs+=(torchao)
pins=()
for p in "${pkgs[@]}"; do
  v=$("$PIP" show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  [ -n "$v" ] || { echo "$p is not in .venv (torchao: pip install 'torchao==0.17.0' into it first)" >&2; exit 1; }
  pins+=("$p==$v")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
if [ "${BIND:-0}" = 1 ] && [ ! -f .whl/tiny-bind/text_encoder_2/model.safetensors ]; then
  .venv/bin/python -m fluxtrain.models.tiny --text-binding fluxtrain/assets/tiny-flux --out .whl/tiny-bind \
    --text-steps 1500
fi
du -sh .whl
