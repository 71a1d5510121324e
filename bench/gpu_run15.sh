#!/usr/bin/env bash
# For the next multi-GPU call (#6): the ablation with CUDA graphs, RPG runs per GPU, only the arms in ARMS (a call is
# at most 10 minutes: data ~2 min + 5 min of training + scoring). On 4 GPUs with RPG=2:
#   ARMS="baseline clean complex itc" bash bench/gpu_run15.sh   then   ARMS="all" bash bench/gpu_run15.sh
# (RES=128: data, caches and runs at 128 px). Then join the two ablation.json files with `python bench/adherence_ablation.py --merge A.json B.json --out DIR`.
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 570 python3 bench/adherence_ablation.py --work /tmp/ablation --out "$OUT" --max-minutes ${MAX_MIN:-5} \
  --num ${NUM:-32000} --chunks ${CHUNKS:-16} --batch ${BATCH:-128} --runs-per-gpu ${RPG:-2} --cuda-graphs ${RES:+--resolution $RES} \
  --arms ${ARMS:-baseline clean complex itc all} 2>&1 | grep -v "UserWarning\|warnings.warn\|Loading weights" | tail -16
cd /tmp/ablation && tar czf "$OUT/logs.tgz" train-*.log warm*.log evals/*.json runs/*/metrics.jsonl 2>/dev/null
