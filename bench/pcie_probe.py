"""Host↔GPU copy bandwidth from pinned memory, one GPU alone and all GPUs at once, each direction alone and both
together: the ceiling of parallel.optimizer_offload, which moves 8 bytes per sharded parameter each way per step.

    python bench/pcie_probe.py --gib 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.multiprocessing as mp


def probe(rank: int, gib: float, mode: str, barrier, out) -> None:
    torch.cuda.set_device(rank)
    n = int(gib * 2**30) // 4
    host_in, host_out = torch.empty(n, pin_memory=True), torch.empty(n, pin_memory=True)
    dev_in, dev_out = torch.empty(n, device="cuda"), torch.randn(n, device="cuda")
    s_in, s_out = torch.cuda.Stream(), torch.cuda.Stream()
    for _ in range(2):  # the first round warms up
        barrier.wait()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if mode in ("h2d", "both"):
            with torch.cuda.stream(s_in):
                dev_in.copy_(host_in, non_blocking=True)
        if mode in ("d2h", "both"):
            with torch.cuda.stream(s_out):
                host_out.copy_(dev_out, non_blocking=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    out[rank] = gib * 2**30 / 1e9 / dt  # GB/s per direction


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    for gpus in sorted({1, torch.cuda.device_count()}):
        for mode in ("h2d", "d2h", "both"):
            with ctx.Manager() as m:
                out, barrier = m.dict(), m.Barrier(gpus)
                procs = [ctx.Process(target=probe, args=(r, a.gib, mode, barrier, out)) for r in range(gpus)]
                for p in procs:
                    p.start()
                for p in procs:
                    p.join()
                rates = [round(out[r], 1) for r in range(gpus)]
            print(json.dumps({"gpus": gpus, "mode": mode, "GB_s_per_gpu_per_direction": rates}), flush=True)


if __name__ == "__main__":
    main()
