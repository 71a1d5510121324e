#!/usr/bin/env bash
# #8, nvidia-h200-x4: why gpu_run30's offload rows after the first offload row of a launch went NaN. The offload
# tests (now with the ring filled with NaN first, so an update that read moments before they arrived goes NaN), then
# 12B twice in one launch with the ring NaN-filled at creation: 6 GiB ring, then the least ring; warm-up losses kept.
set -u
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pytest -q -p no:cacheprovider tests/parallel/test_optimizer_offload.py > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
sed -i 's/self._buf = torch.empty(self.ring_elems, device=self.device)/self._buf = torch.full((self.ring_elems,), float("nan"), device=self.device)/' fluxtrain/parallel/optimizer_offload.py
grep -c 'float("nan"), device=self.device' fluxtrain/parallel/optimizer_offload.py
V="ac=selective,ac_ops=1,compile=1"
timeout 330 torchrun --nproc_per_node 4 bench/train_step.py --preset flux-dev --resolution 1024 --batch 4 \
  --attn cudnn --warmup 2 --steps 3 --variants "$V,ooff=1,obuf=6" "$V,ooff=1" > "$OUT/bench.log" 2>&1
grep "^{\|Error\|error\|failed" "$OUT/bench.log" | cut -c1-200
grep -o '"variant[^,]*,[^,]*,[^,]*,[^,]*\|"warmup_losses.*\|"loss_first[^}]*' "$OUT/bench.log" | head
