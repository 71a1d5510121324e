"""Where a training step makes the host wait for the GPU: `fluxtrain train` in this process under
torch.cuda.set_sync_debug_mode("warn"), every synchronizing call counted by the source line that made it.

    python bench/sync_count.py --config configs/ablation-small.toml --model.preset deep --data.source synthetic \
        --train.steps 60 --train.compile true --train.compile_mode reduce-overhead --log.interval 20

A small model's step is host time and GPU time in series whenever the host waits (bench/RESULTS.md: 13.6 ms of GPU
work in a 36 ms step). A line counted about once per step is a per-step wait; lines counted a few times are start-up
or log steps. The nineteenth session took the gradient-norm read, the loss read and the pageable batch copies out of
the step (train.QueuedStep, train.to_device); this shows what is left. CUDA only.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def where(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of this repository's code, and the innermost frame of all, if it is elsewhere."""
    ours = [f for f in stack if str(ROOT) in f.filename and "site-packages" not in f.filename
            and not f.filename.endswith("sync_count.py")]
    inner = stack[-1] if stack else None
    if not ours:
        return f"{inner.filename}:{inner.lineno}" if inner else "?"
    f = ours[-1]
    at = f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}"
    return at if inner is f else f"{at} (→ {Path(inner.filename).name}:{inner.lineno} {inner.name})"


def main(argv: list[str]) -> int:
    import torch

    from fluxtrain import config as C
    from fluxtrain.train import train

    if not torch.cuda.is_available():
        raise SystemExit("bench/sync_count.py counts CUDA synchronisations: run it on a GPU machine")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None)
    a, overrides = ap.parse_known_args(argv)
    cfg = C.load(a.config, overrides)
    counts: collections.Counter = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            counts[where(traceback.extract_stack()[:-1])] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = record
    warnings.simplefilter("always")  # a warning from the same line every step, not once
    torch.cuda.set_sync_debug_mode("warn")
    try:
        out = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = shown
    steps = out["step"]
    print(f"\n{sum(counts.values())} synchronizing calls in {steps} steps ({cfg.log.interval}-step log interval):")
    print("| count | per step | where |\n|---|---|---|")
    for at, n in counts.most_common(40):
        print(f"| {n} | {n / max(1, steps):.2f} | `{at}` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
