#!/usr/bin/env bash
# The carried base into the folder $1: .chain/base.pack (bench/chain_prep.sh packs the returned parts with
# bench/weights_pack.py) or, as before the twenty-first session, the parts .chain/warm.tar.NN themselves.
# Exit 3: .chain/ holds neither (the caller says what to do).
set -u
mkdir -p "${1:?usage: bash bench/chain_unpack.sh FOLDER}" || exit 1
if [ -f .chain/base.pack ]; then ${PYTHON:-python3} bench/weights_pack.py unpack .chain/base.pack "$1" >/dev/null
elif ls .chain/warm.tar.* >/dev/null 2>&1; then cat .chain/warm.tar.* | tar xf - -C "$1"
else exit 3; fi
