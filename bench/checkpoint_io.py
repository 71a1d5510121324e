"""Checkpoint cost for a preset: the training stall of an async sharded save, the full save time, and the time of a
full-state export from that checkpoint (offline, one process, as `fluxtrain export`).

    torchrun --nproc_per_node 2 bench/checkpoint_io.py --preset flux-dev --run-dir /tmp/ckbench [--with-optim]
    python -m fluxtrain export --checkpoint /tmp/ckbench/checkpoints/step-00000001 --format diffusers --out /tmp/exp

Without --with-optim only the model is saved (12B fp32 = 48 GB): the lent GPU machines' 128 GB disks can't hold a
FLUX.1-dev training checkpoint with AdamW states (143 GB).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxtrain import config as C  # noqa: E402
from fluxtrain.checkpoint import Checkpointer  # noqa: E402
from fluxtrain.models.setup import build_training_model  # noqa: E402
from fluxtrain.optim import build_optimizer, build_scheduler  # noqa: E402
from fluxtrain.parallel import mesh as pmesh  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flux-dev")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--with-optim", action="store_true")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    cfg = C.load(None, ["--model.preset", a.preset, "--train.device", a.device, "--train.output_dir", a.run_dir,
                        "--checkpoint.async_save", "true"])
    D = pmesh.init(cfg)
    run = Path(a.run_dir)
    if D.is_main:
        run.mkdir(parents=True, exist_ok=True)
        C.save(cfg, run / "config.toml")
    model = build_training_model(cfg, D.mesh, D.device)
    opt = sched = None
    if a.with_optim:
        opt = build_optimizer(model.parameters(), cfg.optim, D.device)
        sched = build_scheduler(opt, 10, cfg.optim)
        for p in model.parameters():  # materialize AdamW state with one zero-gradient step
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    ck = Checkpointer(run, cfg.checkpoint, D.rank, D.world_size, D.device)
    dist.barrier()
    t0 = time.perf_counter()
    stall = ck.save(1, model, opt, sched, {"data": {}})
    ck.wait()
    total = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step-00000001").rglob("*") if f.is_file())
    if D.is_main:
        print(json.dumps({"preset": a.preset, "gpus": D.world_size, "with_optim": a.with_optim, "stall_s": stall,
                          "save_total_s": total, "size_gb": size / 1e9}), flush=True)
    pmesh.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
