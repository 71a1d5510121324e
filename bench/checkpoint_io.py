"""Checkpoint cost for a preset, for both ways an async save stages the state off the GPU (`checkpoint.staging`):
`sync` (pageable host copy before training continues, DCP's default) and `background` (pinned host memory, copied on
a thread). One JSON line per save:

    stall_s       time until training may continue with nothing to overlap (save() + waiting for the copy)
    save_call_s   time save() itself blocked: the stall when the next step's forward/backward hides the copy
    save_total_s  until the checkpoint is written and published

With background staging a `reserve_s` line comes first: pinning the host buffers, which training does on a thread
after its first step (Checkpointer.prepare), so no save waits for it.

Times are the slowest rank's. Then the time of a full-state export (offline, one process, as `fluxtrain export`):

    torchrun --nproc_per_node 2 bench/checkpoint_io.py --preset flux-dev --run-dir /tmp/ckbench [--with-optim] \
        [--repeats 2] [--checkpoint.dir s3://bucket/ckbench]
    python -m fluxtrain export --checkpoint /tmp/ckbench/checkpoints/step-0000000N --format diffusers --out /tmp/exp

Without --with-optim only the model is saved (12B fp32 = 48 GB): the lent GPU machines' 128 GB disks can't hold a
FLUX.1-dev training checkpoint with AdamW states (143 GB). `checkpoint.keep = 1`: at most two checkpoints on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxtrain import config as C  # noqa: E402
from fluxtrain.checkpoint import Checkpointer, complete_checkpoints  # noqa: E402
from fluxtrain.models.setup import build_training_model  # noqa: E402
from fluxtrain.optim import build_optimizer, build_scheduler  # noqa: E402
from fluxtrain.parallel import mesh as pmesh  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flux-dev")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--with-optim", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=2, help="saves per staging mode (the first one warms up)")
    ap.add_argument("--staging", nargs="+", default=["sync", "background"], choices=["sync", "background"])
    a, overrides = ap.parse_known_args()  # the rest: config overrides such as --checkpoint.dir URL
    cfg = C.load(None, ["--model.preset", a.preset, "--train.device", a.device, "--train.output_dir", a.run_dir,
                        "--checkpoint.async_save", "true", "--checkpoint.keep", "1", *overrides])
    D = pmesh.init(cfg)
    run = Path(a.run_dir)
    if D.is_main:
        run.mkdir(parents=True, exist_ok=True)
        C.save(cfg, run / "config.toml")
    model = build_training_model(cfg, D.mesh, D.device)
    opt = sched = None
    if a.with_optim:
        opt = build_optimizer(model.parameters(), cfg.optim)
        sched = build_scheduler(opt, 10, cfg.optim)
        for p in model.parameters():  # materialize AdamW state with one zero-gradient step
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    step = 0
    for staging in a.staging:
        ck = Checkpointer(run, dataclasses.replace(cfg.checkpoint, staging=staging), D.rank, D.world_size, D.device)
        t0 = time.perf_counter()
        reserving = ck.prepare(model, opt, sched)  # what training does after its first step (background staging)
        if reserving is not None:
            reserving.result()
            if D.is_main:
                print(json.dumps({"staging": staging, "reserve_s": time.perf_counter() - t0}), flush=True)
        for _ in range(a.repeats):
            step += 1
            dist.barrier()
            t0 = time.perf_counter()
            ck.save(step, model, opt, sched, {"data": {}})
            t_call = time.perf_counter() - t0
            ck.staged()
            t_stall = time.perf_counter() - t0
            ck.wait()
            t_total = time.perf_counter() - t0
            times = torch.tensor([t_call, t_stall, t_total], device=D.device)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            if D.is_main:
                from fsspec.core import url_to_fs

                fs, newest = url_to_fs(str(complete_checkpoints(ck.root)[-1]))
                call, stall, total = times.tolist()
                print(json.dumps({"preset": a.preset, "gpus": D.world_size, "with_optim": a.with_optim,
                                  "staging": staging, "step": step, "stall_s": stall, "save_call_s": call,
                                  "save_total_s": total, "size_gb": fs.du(newest) / 1e9}), flush=True)
    pmesh.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
