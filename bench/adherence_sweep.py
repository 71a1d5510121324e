"""A learning-speed sweep on the synthetic prompt-adherence benchmark (issue #6): which settings learn it fastest.

    python bench/adherence_sweep.py --work /tmp/sweep --out bench/sweep --max-minutes 4.5 \\
        --variants "base=" "lr2e3=--optim.lr 2e-3" "b256=--train.batch_size 256" "r128=--res 128" \\
        --evals "cfg4=--true-cfg 4" "cfg2=--true-cfg 2"

One training set (--data, default complex_clean: the ablation's "all" arm data, 20% label noise planted, half the
scenes complex, then cleaned) is made and cached as `bench/adherence_ablation.py` does it, once per resolution a
variant needs. Each variant NAME=ARGS is the ablation's run without ITC (its config, preset, cache, caption dropout,
EMA, compile, --cuda-graphs) with ARGS, trainer overrides, appended last; the pseudo-override `--res N` picks the
resolution of the variant's data, cache and run. Every (variant, seed) run is its own process; all start at once,
round-robin over the visible GPUs, and get SIGTERM at --max-minutes (the trainer checkpoints and exits 0). Each run's
checkpoint is then scored under every eval setting NAME=ARGS (`fluxtrain eval` options) and --eval-seeds, all at
once. The compile caches are warmed for the base shapes only: a variant with another preset, batch or resolution
compiles on its own (its first_log_s, the wall time of its first logged interval, shows the cost).
Writes `sweep.json` (per run: steps, samples, train seconds, last loss, samples/s, per-setting passes per split and
form) and `sweep.md` (one row per variant and eval setting) to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import adherence_ablation as AA  # noqa: E402

SETS = ["simple_noisy", "simple_clean", "complex_noisy", "complex_clean"]
FORMS = ["single", "count", "pair", "relation", "complex"]


def named(specs: list[str], what: str) -> dict[str, list[str]]:
    """NAME=ARGS strings → {NAME: [args]}."""
    out = {}
    for spec in specs:
        name, _, args = spec.partition("=")
        if not re.fullmatch(r"[\w.+-]+", name) or name in out:
            raise SystemExit(f"bad or repeated {what} name in {spec!r} (NAME=ARGS, NAME of [A-Za-z0-9_.+-])")
        out[name] = shlex.split(args)
    return out


def pop_res(args: list[str], default: int) -> tuple[int, list[str]]:
    """The pseudo-override `--res N` taken out of a variant's arguments."""
    if "--res" not in args:
        return default, args
    i = args.index("--res")
    return int(args[i + 1]), args[:i] + args[i + 2:]


def run_summary(run: Path) -> dict:
    """Steps reached (the last checkpoint), batch, last loss, median samples/s after the first logged interval and
    that first interval's wall time (start-up and compilation included), from the run's folder."""
    ckpts = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    cfg = tomllib.loads((run / "config.toml").read_text()) if (run / "config.toml").is_file() else {}
    log = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    ms = [m for m in map(json.loads, log) if "loss" in m]
    sps = [m["samples_per_s"] for m in ms[1:] or ms if m.get("samples_per_s")]
    steps = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
    batch = cfg.get("train", {}).get("batch_size", 0) * cfg.get("train", {}).get("grad_accum", 1)
    return dict(ckpt=str(ckpts[-1]) if ckpts else None, earlier=[str(c) for c in ckpts[:-1]], steps=steps,
                batch=batch, samples=steps * batch,
                loss=ms[-1]["loss"] if ms else None, samples_per_s=statistics.median(sps) if sps else None,
                first_log_s=ms[0]["step_time_s"] * ms[0]["step"] if ms and "step_time_s" in ms[0] else None)


def mean(xs: list) -> float | None:
    return statistics.mean(xs) if xs else None


def seed_mean(rs: list[dict]) -> dict:
    """`fluxtrain eval` reports of one checkpoint (one per eval seed) → complex, simple and per-form pass means."""
    return dict(**{k: mean([r["per_split"][k]["pass"] for r in rs if k in r["per_split"]])
                   for k in ("complex", "simple")},
                per_form={f: mean([r["per_form"][f]["pass"] for r in rs if f in r["per_form"]])
                          for f in FORMS if any(f in r["per_form"] for r in rs)})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sweep")
    ap.add_argument("--out", default="bench/sweep")
    ap.add_argument("--variants", nargs="+", default=["base="],
                    help='NAME=ARGS: trainer overrides, appended last ("lr2e3=--optim.lr 2e-3"); --res N: resolution')
    ap.add_argument("--evals", nargs="+", default=["cfg4=--true-cfg 4"],
                    help='NAME=ARGS: fluxtrain eval options, e.g. "cfg4s50=--true-cfg 4 --steps 50"')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--data", choices=SETS, default="complex_clean")
    ap.add_argument("--num", type=int, default=32_000, help="samples per data set")
    ap.add_argument("--data-seed", type=int, default=0, help="another value draws other scenes")
    ap.add_argument("--chunks", type=int, default=16, help="parallel synth/clean processes per data set")
    ap.add_argument("--next-data-seed", type=int, default=None,
                    help="while the runs train, make (niced, on the CPU) the scenes of this data seed, so that the "
                         "next warm-started stage on this machine finds them ready (a chain's stage spent ~100 s of "
                         "its call making its data)")
    ap.add_argument("--data-only", action="store_true", help="make the data sets (not their caches) and stop")
    ap.add_argument("--config", default="configs/ablation-small.toml")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=100_000, help="an upper bound: --max-minutes ends the runs")
    ap.add_argument("--schedule", choices=["constant", "cosine", "linear"], default="constant",
                    help="optim.schedule over --steps (cosine: set --steps to what --max-minutes allows)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=64, help="of the variants without --res")
    ap.add_argument("--caption-dropout", type=float, default=0.1, help="for classifier-free guidance at eval")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-minutes", type=float, default=4.5, help="per run (all runs at once)")
    ap.add_argument("--deadline-minutes", type=float, default=None,
                    help="the whole sweep's budget from its start (data, training, scoring): the runs' clock is cut "
                         "so that --eval-reserve-s is left for scoring (a device call's limit; the fourteenth session's "
                         "first medium stage trained to the clock and its scoring was killed by the call's timeout)")
    ap.add_argument("--eval-reserve-s", type=float, default=75.0, help="left for scoring under --deadline-minutes")
    ap.add_argument("--gpus", type=int, default=None, help="default: all visible")
    ap.add_argument("--encoders", default="shipped",
                    help="a tiny-FLUX folder, 'shipped' (default; gpu_run36/37) or 'bind' (as the ablation's "
                         "--encoders)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="per-block torch.compile (default: on with GPUs); the caches are warmed while data is made")
    ap.add_argument("--cuda-graphs", action="store_true", help="train.compile_mode = reduce-overhead")
    ap.add_argument("--ema-decay", type=float, default=0.995, help="score the EMA weights (0: the raw weights)")
    ap.add_argument("--log-interval", type=int, default=None, help="log.interval (default: the config's)")
    ap.add_argument("--eval-limit", type=int, default=None, help="fluxtrain eval --limit (smoke runs)")
    ap.add_argument("--curve", action="store_true",
                    help="also score every earlier checkpoint (keep them: --checkpoint.interval N --checkpoint.keep K "
                         "in the variant) under the first eval setting: a learning curve per run")
    a = ap.parse_args()
    variants = {n: pop_res(v, a.resolution) for n, v in named(a.variants, "variant").items()}
    settings = named(a.evals, "eval")
    a.source, a.itc_weight = "cache", 0.0  # what AA.train_args and AA.warm_compile_cache read
    work, out = Path(a.work), Path(a.out)

    def data_dir(r: int) -> Path:  # keyed by the data seed, so that a warm-started stage's scenes are fresh
        return work / f"r{r}-d{a.data_seed}"

    def make_data() -> dict:  # every resolution's data at once (the noisy set that --data is, or is cleaned from)
        only = (a.data.replace("clean", "noisy"),)
        for r in resolutions:
            data_dir(r).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(len(resolutions)) as ex:
            made = ex.map(lambda r: AA.make_data(data_dir(r), a.num, a.chunks, r, only, a.data_seed), resolutions)
            return dict(zip(resolutions, made))

    work.mkdir(parents=True, exist_ok=True)
    resolutions = sorted({r for r, _ in variants.values()})
    if a.data_only:
        print(json.dumps(make_data()), flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    import torch

    gpus = a.gpus if a.gpus is not None else torch.cuda.device_count()
    compile_ = a.compile if a.compile is not None else gpus > 0

    t0 = time.time()
    AA.resolve_encoders(a, work)
    warm = AA.warm_compile_cache(a, work, gpus, with_itc=False) if compile_ else []
    cleaning = make_data()
    AA.run_all([AA.cache_cmd(a, data_dir(r), a.data, r, AA.gpu_env(i, gpus)) for i, r in enumerate(resolutions)
                if not (data_dir(r) / f"cache-{a.data}" / "manifest.json").is_file()])
    data_s = time.time() - t0
    print(f"data ready in {data_s:.0f}s: {cleaning}", flush=True)
    codes = [p.wait() for p in warm]
    if codes and codes[0]:
        compile_ = False  # a compiled run that can't start would cost every variant its score
        print(f"compiled warm-up failed (logs {work}/warm*.log): the runs train eagerly", flush=True)
    elif a.cuda_graphs and codes and codes[-1]:
        a.cuda_graphs = False
        print(f"CUDA-graph warm-up failed (log {work}/warm1.log): default compile mode", flush=True)

    for d in ("runs", "evals", "curve"):  # an earlier call's checkpoints and scores must not be taken for this one's
        shutil.rmtree(work / d, ignore_errors=True)
    runs = [(v, s) for v in variants for s in a.seeds]
    cmds = []
    for i, (v, seed) in enumerate(runs):
        res, extra = variants[v]
        ra = copy.copy(a)
        ra.resolution = res
        run = work / "runs" / f"{v}-s{seed}"
        ov = AA.train_args(ra, data_dir(res) / f"cache-{a.data}", run, seed, 0.0, compile_)
        ov += (["--log.interval", str(a.log_interval)] if a.log_interval else []) + extra
        cmds.append((AA.PY + ov, {**AA.gpu_env(i, gpus), "OMP_NUM_THREADS": "1"}, work / f"train-{v}-s{seed}.log"))
    clock = train_clock(a.max_minutes, a.deadline_minutes, time.time() - t0, a.eval_reserve_s)
    print(f"training clock {clock:.0f}s", flush=True)
    ahead = data_ahead(a, resolutions) if a.next_data_seed is not None else None
    walls = AA.run_all(cmds, timeout_s=clock)
    summaries = [run_summary(work / "runs" / f"{v}-s{s}") for v, s in runs]

    (work / "evals").mkdir(exist_ok=True)
    (work / "curve").mkdir(exist_ok=True)
    evals = []
    lim = ["--limit", str(a.eval_limit)] if a.eval_limit else []
    first = next(iter(settings))
    for (v, seed), sm in zip(runs, summaries):
        # (checkpoint, setting, folder, name suffix): the last under every setting, earlier ones (--curve) the first
        jobs = [(sm["ckpt"], e, "evals", "") for e in settings if sm["ckpt"]]
        jobs += [(ck, first, "curve", f"-{Path(ck).name}") for ck in (sm["earlier"] if a.curve else [])]
        for ck, e, folder, suffix in jobs:
            for es in a.eval_seeds:
                name = f"{v}-s{seed}-{e}-e{es}{suffix}"
                evals.append((AA.eval_cmd(Path(ck), es, work / folder / f"{name}.json", lim + settings[e]),
                              AA.gpu_env(len(evals), gpus), work / f"eval-{name}.log"))
    AA.run_all(evals)
    if ahead is not None:  # the call must not end (and kill it) with the next stage's scenes half made
        code = ahead.wait()
        print(f"data seed {a.next_data_seed} for the next stage: " + (
            "ready" if code == 0 else f"failed ({code}), log {work}/data-ahead.log: that stage makes its own"),
            flush=True)

    rows = []
    for (v, seed), sm, wall in zip(runs, summaries, walls):
        scored = {}
        for e in settings:
            rs = [json.loads(p.read_text()) for p in sorted((work / "evals").glob(f"{v}-s{seed}-{e}-e*.json"))]
            scored[e] = dict(**seed_mean(rs), n=sum(r["n"] for r in rs), eval_seeds=len(rs))
        rows.append(dict(variant=v, args=shlex.join(variants[v][1]), res=variants[v][0], seed=seed, train_s=wall,
                         **{k: x for k, x in sm.items() if k != "ckpt"}, evals=scored))
        print(json.dumps({k: x for k, x in rows[-1].items() if k != "evals"}), flush=True)
    curve = []  # (variant, seed, step): passes under the first eval setting, earlier checkpoints then the last
    for (v, seed), row in zip(runs, rows):
        by_step: dict[int, list[dict]] = {}
        for p in sorted((work / "curve").glob(f"{v}-s{seed}-{first}-e*-step-*.json")):
            by_step.setdefault(int(p.stem.rsplit("-", 1)[1]), []).append(json.loads(p.read_text()))
        for step, rs in sorted(by_step.items()):  # the mean over eval seeds, like the last checkpoint's row
            curve.append(dict(variant=v, seed=seed, step=step, samples=step * row["batch"], **seed_mean(rs)))
        if a.curve and row["evals"].get(first, {}).get("eval_seeds"):
            last = row["evals"][first]
            curve.append(dict(variant=v, seed=seed, step=row["steps"], samples=row["samples"], complex=last["complex"],
                              simple=last["simple"], per_form=last["per_form"]))
    result = dict(args=vars(a), curve=curve, data=a.data, cleaning=cleaning, data_s=data_s, gpus=gpus,
                  compiled=compile_,
                  card=torch.cuda.get_device_name(0) if gpus else "CPU", rows=rows)
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    (out / "sweep.md").write_text(table(result))
    print(table(result))
    return 0


def data_ahead(a, resolutions: list[int]) -> subprocess.Popen:
    """This script with --data-only for --next-data-seed, niced, so that the training runs keep their CPU time."""
    cmd = ["nice", "-n", "19", sys.executable, __file__, "--data-only", "--work", str(Path(a.work).resolve()),
           "--data", a.data, "--num", str(a.num), "--chunks", str(a.chunks), "--data-seed", str(a.next_data_seed),
           "--variants"] + [f"r{r}=--res {r}" for r in resolutions]
    return subprocess.Popen(cmd, stdout=open(Path(a.work) / "data-ahead.log", "w"), stderr=subprocess.STDOUT,
                            cwd=AA.ROOT)


def train_clock(max_minutes: float, deadline_minutes: float | None, elapsed_s: float, reserve_s: float) -> float:
    """Seconds the runs may train: --max-minutes, cut to what the deadline leaves after the time already spent (data,
    compile warm-up) and the scoring reserve. Under a minute left is an error, before any run starts."""
    clock = 60 * max_minutes
    if deadline_minutes is not None:
        left = 60 * deadline_minutes - elapsed_s - reserve_s
        if left < 60:
            raise SystemExit(f"--deadline-minutes {deadline_minutes} leaves {left:.0f}s of training after "
                             f"{elapsed_s:.0f}s of data and a {reserve_s:.0f}s scoring reserve: raise the deadline "
                             "or make less data (--num)")
        clock = min(clock, left)
    return clock


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def table(r: dict) -> str:
    """One row per (variant, eval setting): passes are means over the variant's seeds (each a mean over eval seeds)."""
    forms = [f for f in FORMS if any(f in s["per_form"] for row in r["rows"] for s in row["evals"].values())]
    lines = ["| variant | args | eval | steps | samples | samples/s | complex pass | simple pass | "
             + " | ".join(forms) + " |", "|---" * (8 + len(forms)) + "|"]
    by = {}
    for row in r["rows"]:
        by.setdefault(row["variant"], []).append(row)
    for v, rs in by.items():
        sps = [x["samples_per_s"] for x in rs if x["samples_per_s"]]
        res = f" (res {rs[0]['res']})" if rs[0]["res"] != r["args"]["resolution"] else ""
        for e in rs[0]["evals"]:
            ev = [x["evals"][e] for x in rs if x["evals"][e]["eval_seeds"]]
            cells = [mean([s[k] for s in ev if s[k] is not None]) for k in ("complex", "simple")]
            cells += [mean([s["per_form"][f] for s in ev if s["per_form"].get(f) is not None]) for f in forms]
            lines.append(f"| {v} | `{rs[0]['args'] or '(none)'}`{res} | {e} | {'/'.join(str(x['steps']) for x in rs)} "
                         f"| {'/'.join(str(x['samples']) for x in rs)} | {f'{mean(sps):.0f}' if sps else '—'} | "
                         + " | ".join(pct(c) for c in cells) + " |")
    if r.get("curve"):
        lines += ["", f"Learning curve ({next(iter(r['rows'][0]['evals']))}, mean over eval seeds):", "",
                  "| variant | seed | step | samples | complex pass | simple pass | " + " | ".join(forms) + " |",
                  "|---" * (6 + len(forms)) + "|"]
        for c in sorted(r["curve"], key=lambda c: (c["variant"], c["seed"], c["step"])):
            lines.append(f"| {c['variant']} | {c['seed']} | {c['step']} | {c['samples']} | {pct(c['complex'])} | "
                         f"{pct(c['simple'])} | " + " | ".join(pct(c["per_form"].get(f)) for f in forms) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
