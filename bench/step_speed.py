"""Training speed of variants of one run, one variant at a time on the GPU (#6's chain stages, the ablation's arms).

    python bench/step_speed.py --work /tmp/speed --preset deep --cache /tmp/sweep/r64-d2/cache-complex_clean \
        --encoders .whl/tiny-bind --steps 300 --variants "b256=" "b512=--train.batch_size 512"

Each variant is the chain's training command (bench/adherence_ablation.py's train_args: the ablation config, cached
latents, caption dropout, EMA, per-block compile with CUDA graphs) with its trainer overrides appended, run alone for
--steps. Its rate is the median of the log rows' samples/s after the first --skip rows (compilation and CUDA-graph
capture), so the variants' ratios come from one machine in one call. A variant that fails gets a row with its
error, and the next one runs. Without --cache a cache is made first.

The twentieth session's stage ran 6,098 samples/s at batch 256 (fp32/TF32), 3.8% MFU. On an H100 in the
twenty-first session: 6,959 at 256, 7,893 at 512 (1.13x), 8,658 at 1024 (1.24x): the step is GPU time more than
host time, so a larger batch buys little.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import adherence_ablation as AA  # noqa: E402
from adherence_sweep import named  # noqa: E402


def rate(run: Path, skip: int) -> dict:
    """Median samples/s (and the MFU beside it) of a run's log rows after the first `skip`."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    bad = [r for r in rows if r.get("event") == "nonfinite"]
    rows = [r for r in rows if "event" not in r and r.get("samples_per_s")]
    kept = rows[skip:]
    if not kept:
        raise ValueError(f"{len(rows)} log rows, none after the first {skip}"
                         + (f"; {len(bad)} non-finite steps" if bad else ": give more --steps"))
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in kept),
            "mfu": statistics.median(r.get("mfu") or 0.0 for r in kept), "rows": len(kept),
            "loss": kept[-1]["loss"], "batch": tomllib.loads((run / "config.toml").read_text())["train"]["batch_size"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/speed")
    ap.add_argument("--out", default=None, help="the table as JSON (default: WORK/step_speed.json)")
    ap.add_argument("--variants", nargs="+", default=["base="], help="NAME=ARGS: trainer overrides, appended last")
    ap.add_argument("--cache", default=None, help="a `fluxtrain cache` folder (default: a small one made in WORK)")
    ap.add_argument("--num", type=int, default=16384, help="scenes of the cache made without --cache (64 batches of 256)")
    ap.add_argument("--config", default="configs/ablation-small.toml")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--encoders", default=None, help="a tiny-FLUX folder (default: the config's)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--log-interval", type=int, default=50)
    ap.add_argument("--skip", type=int, default=2, help="log rows left out at the start (compile, graph capture)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="per-block torch.compile with CUDA graphs (default: on with a GPU)")
    a = ap.parse_args()
    variants = named(a.variants, "variant")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    gpu = torch.cuda.is_available()
    compile_ = a.compile if a.compile is not None else gpu
    # what AA.train_args reads
    a.source, a.caption_dropout, a.schedule, a.itc_weight, a.cuda_graphs = "cache", 0.1, "cosine", 0.0, True
    a.resolution, a.ema_decay, a.base = None, 0.995, None
    cache = Path(a.cache) if a.cache else work / "cache-complex_noisy"
    if not (cache / "manifest.json").is_file():
        if a.cache:
            raise SystemExit(f"--cache {cache} has no manifest.json: give a `fluxtrain cache` folder")
        AA.make_data(work, a.num, 16, None, ("complex_noisy",))
        cmd, env, log = AA.cache_cmd(a, work, "complex_noisy", None, {})
        AA.run_all([(cmd, env, log)])
        if not (cache / "manifest.json").is_file():
            raise SystemExit(f"the cache was not made: see {log}")
    rows = []
    for name, extra in variants.items():
        run = work / "runs" / name
        cmd = AA.PY + AA.train_args(a, cache, run, 0, 0.0, compile_) + ["--log.interval", str(a.log_interval),
                                                                       "--checkpoint.interval", str(10 * a.steps)] + extra
        t0 = time.time()
        AA.run_all([(cmd, {"OMP_NUM_THREADS": "1"} if gpu else {}, work / f"train-{name}.log")])
        row = dict(variant=name, args=" ".join(extra), wall_s=round(time.time() - t0, 1))
        try:
            row.update(rate(run, a.skip))
        except (OSError, ValueError, KeyError) as e:  # the others still run: one call holds them all
            row["error"] = f"{type(e).__name__}: {e} (log {work}/train-{name}.log)"
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = rows[0].get("samples_per_s")
    for r in rows:
        r["vs_first"] = r["samples_per_s"] / ref if ref and "samples_per_s" in r else None
    table = dict(args=vars(a), device=torch.cuda.get_device_name() if gpu else "cpu", rows=rows)
    out = Path(a.out) if a.out else work / "step_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1))
    print("| variant | samples/s | × first | MFU | loss at end |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} | | | |")
        else:
            x = f"{r['vs_first']:.2f}" if r["vs_first"] else "—"
            print(f"| {r['variant']} | {r['samples_per_s']:,.0f} | {x} | {r['mfu']:.1%} | {r['loss']:.4f} |")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
