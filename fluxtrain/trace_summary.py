"""`fluxtrain trace TRACE.json.gz`: where profiled steps' time went, from a torch.profiler Chrome trace (written by
`log.profile_steps`, or by `bench/train_step.py --profile`).

Over the profiled steps (the `ProfilerStep#N` spans): wall time, GPU busy time (the union of kernel, copy and memset
intervals over all streams), kernel time by kind, and the communication time that no other kernel overlaps
(exposed: the GPU waited for it). Kinds go by kernel name, first match wins; cuDNN's attention kernels carry "sdpa"
or "flash" in their names, inductor's matmul templates "triton_tem".
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

KINDS = [
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "sdpa", "attn", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "triton_tem", "matmul", "wgmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused elementwise", ("triton",)),
]
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def kind(name: str, cat: str) -> str:
    if cat != "kernel":
        return "copies"
    low = name.lower()
    return next((k for k, needles in KINDS if any(n in low for n in needles)), "other")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _minus(intervals, cover) -> float:
    """Length of the union of `intervals` not covered by the union `cover` (both sorted, disjoint)."""
    total, j = 0.0, 0
    for a, b in intervals:
        while j < len(cover) and cover[j][1] <= a:
            j += 1
        covered, k = 0.0, j
        while k < len(cover) and cover[k][0] < b:
            covered += min(b, cover[k][1]) - max(a, cover[k][0])
            k += 1
        total += (b - a) - covered
    return total


def summarize(events: list[dict], top: int = 12) -> dict:
    """Milliseconds per profiled step; `top_kernels`: the `top` kernel names by total time (name, kind, launches,
    ms), which tells apart what one kind holds (e.g. the optimizer's multi-tensor kernels from FSDP's foreach
    copies)."""
    spans = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#")
             and e.get("cat") in ("user_annotation", "cpu_op", None)]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS]
    if not spans and not gpu:
        raise ValueError("no ProfilerStep spans and no GPU kernels in this trace: is it a torch.profiler trace?")
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in gpu]
    if spans:
        wall = sum(float(e.get("dur", 0)) for e in spans)
    else:
        wall = max(b for _, b in intervals) - min(a for a, _ in intervals)
    busy = _union(intervals)
    names = [str(e.get("name", "")) for e in gpu]
    kinds = [kind(n, e["cat"]) for n, e in zip(names, gpu)]
    by_kind: dict[str, float] = {}
    per_name: dict[str, list] = {}
    for n, k, (a, b) in zip(names, kinds, intervals):
        by_kind[k] = by_kind.get(k, 0.0) + (b - a)
        row = per_name.setdefault(n, [k, 0, 0.0])
        row[1] += 1
        row[2] += b - a
    comm = _union([iv for iv, k in zip(intervals, kinds) if k == "communication"])
    rest = _union([iv for iv, k in zip(intervals, kinds) if k != "communication"])
    steps = max(1, len(spans))
    ms = 1e-3 / steps  # trace times are microseconds
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][2])[:top]
    return dict(steps=len(spans), wall_ms=wall * ms, gpu_busy_ms=_length(busy) * ms,
                gpu_idle_ms=max(0.0, wall - _length(busy)) * ms,
                kernels_ms={k: v * ms for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                exposed_communication_ms=_minus(comm, rest) * ms, gpu_kernels=len(gpu),
                top_kernels=[(n[:120], k, c / steps, t * ms) for n, (k, c, t) in ranked])


def load(path: str | Path) -> list[dict]:
    p = Path(path)
    if p.is_dir():  # the profile folder itself: name the traces in it
        found = sorted(p.glob("*.json*"))
        raise FileNotFoundError(f"{p} is a folder: give one of its traces ({', '.join(f.name for f in found[:4])})"
                                if found else f"no trace in {p}: profile with log.profile_steps = [a, b]")
    if not p.is_file():
        raise FileNotFoundError(f"no trace at {p}: profile with log.profile_steps = [a, b] (run_dir/profile/)")
    opener = gzip.open if p.suffix == ".gz" else open
    what = "not a profiler trace (the JSON that log.profile_steps writes to run_dir/profile/)"
    try:
        with opener(p, "rt") as f:
            data = json.load(f)
    except EOFError:  # a .gz copied while it was written
        raise ValueError(f"{what}: the compressed file ends early (copied while it was written?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, gzip.BadGzipFile) as err:
        raise ValueError(f"{what}: {err}") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ValueError(f"{what}: no list of trace events in it")
    return events


def format_summary(s: dict) -> str:
    per = "per step" if s["steps"] else "whole trace"
    lines = [f"{s['steps']} profiled steps, {s['gpu_kernels']} GPU kernels; milliseconds {per}:",
             f"  wall                     {s['wall_ms']:10.2f}"]
    if not s["gpu_kernels"]:
        return "\n".join(lines + ["  no GPU kernels in this trace (profiled on a CPU)"])
    lines += [f"  GPU busy                 {s['gpu_busy_ms']:10.2f}  ({100 * s['gpu_busy_ms'] / s['wall_ms']:.0f}%)",
              f"  GPU idle                 {s['gpu_idle_ms']:10.2f}"]
    lines += [f"    {k:<22} {v:10.2f}" for k, v in s["kernels_ms"].items()]
    lines.append(f"  exposed communication    {s['exposed_communication_ms']:10.2f}  (no other kernel overlapped it)")
    lines.append("  top kernels (ms, launches per step, kind, name):")
    lines += [f"    {t:10.2f} {c:7.0f}  {k:<18} {n[:90]}" for n, k, c, t in s["top_kernels"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fluxtrain trace", description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--top", type=int, default=12, help="how many kernels to list by total time")
    a = ap.parse_args(argv)
    try:
        s = summarize(load(a.trace), a.top)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        print(f"fluxtrain: error: {a.trace}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(s) if a.json else format_summary(s))
    return 0
