"""The prompt-adherence ablation (issue #6): label noise vs cleaning, complex-prompt augmentation and ITC.

    python bench/adherence_ablation.py --work /tmp/ablation --out bench/ablation --seeds 0 1

Arms, each trained from scratch for the same number of steps (--steps, the lr decaying over them: --schedule) and
scored on the held-out complex (and simple) prompt sets with classifier-free guidance (trained with caption dropout)
and --eval-steps sampling steps:
  baseline  20% label noise, simple prompts only
  clean     the baseline's shards after `fluxtrain data clean`
  complex   20% label noise, half the scenes complex (`data synth --complex-frac 0.5`)
  itc       the baseline's data + the ITC auxiliary loss
  all       cleaned complex-augmented shards + ITC
Every (arm, seed) run is its own process; runs go round-robin over the visible GPUs and all run at once (a small
model is launch-bound, so several share a GPU), or in rounds of --runs-per-gpu per GPU (1: each run has a GPU to
itself; there CUDA graphs, --cuda-graphs, give 1.6x the steps; the ITC arms can't use them and take longer). A run
still going at --max-minutes, a guard, gets SIGTERM, which makes the trainer checkpoint and exit 0: it is then scored
at the step it reached (the table says which). Only the data sets the chosen arms train on are made.
Text encoders (--encoders): by default the shipped tiny folder with its T5 trained to bind each object phrase's
colour, shape, count and relation role to its tokens (`python -m fluxtrain.models.tiny --text-binding`), as a
pretrained T5 would; runs v1-v5 used the shipped random T5 (`--encoders shipped`).
--base FOLDER starts every arm from an exported model (its transformer and encoders) instead of from scratch: the
guide's setting, a pretrained model fine-tuned for complex prompts, where a from-scratch arm of ≤ 5 minutes learns
the shapes but not yet the binding (every arm of v1-v6 stayed far below 90%). A base trained on clean simple prompts
only (`DATA=simple_clean bash bench/gpu_chain.sh`) knows objects, colours, counts and relations one at a time; the
arms then differ only in the fine-tuning data and loss.
Writes `ablation.json` and `ablation.md` (the table) to --out; --merge joins the tables of calls that ran different
arms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = [sys.executable, "-m", "fluxtrain"]
PROMPTS = ROOT / "fluxtrain" / "eval" / "prompts"
BASE_ROW = "base"  # with --base: the starting point's own score, a row of the table ("base, not fine-tuned")
ARMS = {  # arm → (data set, ITC weight)
    "baseline": ("simple_noisy", 0.0),
    "clean": ("simple_clean", 0.0),
    "complex": ("complex_noisy", 0.0),
    "itc": ("simple_noisy", None),
    "all": ("complex_clean", None),
}


def run_all(cmds: list[tuple[list[str], dict, Path]], timeout_s: float | None = None) -> list[float]:
    """Start every command at once; SIGTERM the ones past timeout_s; return each one's wall seconds."""
    t0 = time.time()
    procs = [subprocess.Popen(c, env={**os.environ, **e}, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
             for c, e, log in cmds]
    done = [None] * len(procs)
    termed = set()
    while any(d is None for d in done):
        time.sleep(1)
        for i, p in enumerate(procs):
            if done[i] is None and p.poll() is not None:
                done[i] = time.time() - t0
                if p.returncode != 0:
                    print(f"command failed ({p.returncode}): {' '.join(cmds[i][0])}; log {cmds[i][2]}", flush=True)
            elif done[i] is None and timeout_s and time.time() - t0 > timeout_s and i not in termed:
                p.send_signal(signal.SIGTERM)
                termed.add(i)
            elif done[i] is None and timeout_s and time.time() - t0 > timeout_s + 120:
                p.kill()
    return done


def gpu_env(i: int, gpus: int) -> dict:
    """Process i's GPU, round-robin over `gpus` (none on a CPU machine)."""
    return {"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else {}


def make_data(work: Path, num: int, chunks: int, size: int | None = None,
              only: tuple[str, ...] = ("simple_noisy", "complex_noisy"), seed: int = 0) -> dict:
    """Two noisy sets (simple only; half complex) in parallel chunks, then their cleaned copies; `only` those named.
    Another `seed` draws other scenes (the stages of a warm-started run train on fresh ones)."""
    sets = {k: v for k, v in {"simple_noisy": 0.0, "complex_noisy": 0.5}.items() if k in only}
    stamp, made = work / "made.json", {"num": num, "chunks": chunks, "size": size, "seed": seed}
    if all((work / n.replace("noisy", "clean") / f"part{c}" / "report.json").is_file() for n in sets for c in range(chunks)):
        old = json.loads(stamp.read_text()) if stamp.is_file() else None
        if old != made:  # reused silently, other scenes would train as if fresh
            raise SystemExit(f"{work} holds data made with {old}, not {made}: give another --work or remove it")
        return _cleaning_report(work, sets, chunks)  # made by an earlier --data-only call
    cmds = []
    for name, cf in sets.items():
        for c in range(chunks):
            out = work / name / f"part{c}"
            cmds.append((PY + ["data", "synth", "--out", str(out), "--num", str(num // chunks), "--noise-frac", "0.2",
                               "--complex-frac", str(cf),
                               "--seed", str(1000 * (c + 1) + int(cf * 10) + 100_000 * seed)]
                         + (["--size", str(size)] if size else []),
                         {}, work / f"synth-{name}-{c}.log"))
    run_all(cmds)
    cmds = [(PY + ["data", "clean", "--in", str(work / name / f"part{c}" / "*.tar"),
                   "--out", str(work / name.replace("noisy", "clean") / f"part{c}")], {},
             work / f"clean-{name}-{c}.log") for name in sets for c in range(chunks)]
    run_all(cmds)
    stamp.write_text(json.dumps(made))
    return _cleaning_report(work, sets, chunks)


def _cleaning_report(work: Path, sets: dict, chunks: int) -> dict:
    report = {}
    for name in sets:
        dropped = kept = 0
        for c in range(chunks):
            r = json.loads((work / name.replace("noisy", "clean") / f"part{c}" / "report.json").read_text())
            kept += r.get("kept", 0)
            dropped += r.get("dropped", 0)
        report[name.replace("noisy", "clean")] = {"kept": kept, "dropped": dropped}
    return report


def common_overrides(a, compile_: bool) -> list[str]:
    ov = ["--train.compile", str(compile_).lower()]
    ov += ["--data.resolution", str(a.resolution)] if a.resolution else []
    # warmup ramps the decay (min(decay, (1+t)/(10+t))): without it a short run's EMA still holds its random init
    ov += ["--ema.enabled", "true", "--ema.decay", str(a.ema_decay), "--ema.warmup", "true"] if a.ema_decay > 0 else []
    return ov + (["--model.encoders", a.encoders] if a.encoders else [])


def resolve_encoders(a, work: Path) -> None:
    """a.encoders → a folder: 'bind' makes (once) the shipped folder with its T5 trained to bind object phrases
    (fluxtrain.models.tiny.train_text_binding: seconds on a GPU, ~1 min on 2 CPU cores); 'shipped': the shipped
    one."""
    if a.encoders == "shipped":
        a.encoders = None
    elif a.encoders == "bind":
        from fluxtrain.models.tiny import tiny_folder, train_text_binding

        a.encoders = str(work / "tiny-bind")
        if not (work / "tiny-bind" / "text_encoder_2" / "model.safetensors").is_file():
            import torch

            train_text_binding(tiny_folder(), work / "tiny-bind", device="cuda" if torch.cuda.is_available() else "cpu",
                               log=lambda *_: None)


def warm_compile_cache(a, work: Path, gpus: int, with_itc: bool = True) -> list[subprocess.Popen]:
    """A few compiled steps without and (with_itc) with ITC (the same shapes as the runs, on-the-fly synthetic data)
    while the data sets are made, so the runs start from inductor's on-disk caches instead of compiling for a minute.
    With --base the model is the base's (its folder's config gives the shape): v9 warmed the `small` preset up for a
    `deep` base, and its ITC arms compiled on their own."""
    procs = []
    for i, ov in enumerate(warm_cmds(a, work, with_itc)):
        env = {**os.environ, **gpu_env(i, gpus)}
        procs.append(subprocess.Popen(PY + ov, env=env, cwd=ROOT, stdout=open(work / f"warm{i}.log", "w"),
                                      stderr=subprocess.STDOUT))
    return procs


def warm_cmds(a, work: Path, with_itc: bool = True) -> list[list[str]]:
    base = ["--model.pretrained", a.base] if getattr(a, "base", None) else []  # (the sweep has no --base)
    modes = ([(0.0, "default")] + ([(a.itc_weight, "default")] if with_itc else [])
             + ([(0.0, "reduce-overhead")] if a.cuda_graphs else []))
    return [["train", "--config", str(ROOT / a.config), "--model.preset", a.preset, "--data.source", "synthetic",
             "--data.caption_dropout", str(a.caption_dropout), "--train.steps", "12", "--train.batch_size",
             str(a.batch), "--train.output_dir", str(work / f"warm{i}"), "--checkpoint.interval", "1000",
             "--eval.interval", "0", "--log.interval", "4", "--train.itc_weight", str(itc),
             "--train.compile_mode", mode] + base + common_overrides(a, True) for i, (itc, mode) in enumerate(modes)]


WARM_STAMP = "warm.json"  # in the work folder: the key of the last warm-up that succeeded


def start_warm_up(a, work: Path, gpus: int) -> tuple[list[subprocess.Popen], str]:
    """The compile warm-up's processes and its key, to be written to WARM_STAMP once they all succeed; none where
    the stamp holds this key already."""
    stamp, key = work / WARM_STAMP, warm_key(a, work)
    if stamp.is_file() and stamp.read_text() == key:
        print(f"compile caches warmed by an earlier call for the same runs ({stamp}): no warm-up", flush=True)
        return [], key
    stamp.unlink(missing_ok=True)
    return warm_compile_cache(a, work, gpus), key


def warm_key(a, work: Path, with_itc: bool = True) -> str:
    """What a finished warm-up compiled for: its command lines, the base's shape (a base at the same path may have
    another) and the torch version. A later call on the same machine with the same key finds inductor's caches
    filled and skips the warm-up (v10's second call spent 46 s on one over warm caches)."""
    import torch

    cfg = Path(a.base) / "transformer" / "config.json" if getattr(a, "base", None) else None
    shape = json.loads(cfg.read_text()) if cfg and cfg.is_file() else None
    return json.dumps({"cmds": warm_cmds(a, work, with_itc), "base_shape": shape, "torch": torch.__version__})


def cache_cmd(a, work: Path, d: str, resolution: int | None, env: dict) -> tuple[list[str], dict, Path]:
    """`fluxtrain cache` of data set d into work/cache-d: latents and embeddings once, so steps skip PNG, VAE, text."""
    return (PY + ["cache", "--config", str(ROOT / a.config), "--out", str(work / f"cache-{d}"),
                  "--data.path", str(work / d / "part*" / "*.tar"), "--batch-size", "256"]
            + (["--data.resolution", str(resolution)] if resolution else [])
            + (["--model.encoders", a.encoders] if a.encoders else []), env, work / f"cache-{d}.log")


def train_args(a, path: Path, run: Path, seed: int, itc: float | None, compile_: bool) -> list[str]:
    """`fluxtrain train` arguments of one run (itc None: a.itc_weight); it checkpoints only at its end (SIGTERM)."""
    ov = ["train", "--config", str(ROOT / a.config), "--model.preset", a.preset, "--data.source", a.source,
          "--data.path", str(path), "--data.seed", str(seed), "--data.caption_dropout", str(a.caption_dropout),
          "--train.seed", str(seed), "--train.steps", str(a.steps), "--train.batch_size", str(a.batch),
          "--train.output_dir", str(run), "--optim.lr", str(a.lr), "--optim.schedule", a.schedule,
          "--checkpoint.interval", str(a.steps),
          "--train.itc_weight", str(a.itc_weight if itc is None else itc)] + common_overrides(a, compile_)
    if getattr(a, "itc_sigma_scale", 1.0) != 1.0:  # (nor --itc-sigma-scale)
        ov += ["--train.itc_sigma_scale", str(a.itc_sigma_scale)]
    if getattr(a, "base", None):  # (bench/adherence_sweep.py shares this and has no --base)
        ov += ["--model.pretrained", a.base]
    if compile_ and a.cuda_graphs and itc == 0.0:  # ITC is not proven under CUDA graphs (config.py)
        ov += ["--train.compile_mode", "reduce-overhead"]
    return ov


def fresh_runs(work: Path, runs: list[tuple[str, int]]) -> int:
    """Removes what an earlier call left of these (arm, seed) runs in `work`, and returns how many. The trainer moves
    an earlier run's checkpoints aside once it starts (checkpoint.resume = never); a run that fails before that would
    otherwise be scored by the earlier call's checkpoint, as if it were this call's."""
    stale = [work / "runs" / f"{arm}-s{seed}" for arm, seed in runs if (work / "runs" / f"{arm}-s{seed}").exists()]
    for run in stale:
        shutil.rmtree(run)
    return len(stale)


def eval_cmd(ckpt: Path, seed: int, out: Path, extra: list[str]) -> list[str]:
    """`fluxtrain eval` of a checkpoint on the held-out complex and simple prompts, with extra options."""
    return PY + ["eval", "--model", str(ckpt), "--prompts", str(PROMPTS / "complex.txt"), "--prompts",
                 str(PROMPTS / "simple.txt"), "--seed", str(seed), "--batch", "128"] + extra + ["--out", str(out)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/ablation")
    ap.add_argument("--out", default="bench/ablation")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--num", type=int, default=48_000, help="samples per data set")
    ap.add_argument("--chunks", type=int, default=8, help="parallel synth/clean processes per data set")
    ap.add_argument("--config", default="configs/ablation-small.toml")
    ap.add_argument("--preset", default="small")
    # gpu_run41/42 (bound T5, batch 256, one run alone on an H200): a cosine decay over 8,000 steps passed 43.8% of
    # complex prompts on both seeds, a constant lr stopped by the clock at 7,728 steps 32.8%
    ap.add_argument("--steps", type=int, default=5000, help="every arm's step budget (ITC arms too)")
    ap.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                    help="optim.schedule over --steps")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=None,
                    help="image side for data, training and eval (default: the config's; the tiny VAE's round trips "
                         "pass the checker at 64 and 128 alike)")
    ap.add_argument("--source", choices=["cache", "webdataset"], default="cache")
    ap.add_argument("--caption-dropout", type=float, default=0.1, help="for classifier-free guidance at eval")
    ap.add_argument("--true-cfg", type=float, default=4.0, help="eval's classifier-free guidance scale")
    ap.add_argument("--eval-steps", type=int, default=50, help="sampling steps at eval (gpu_run42: 50 beat 20)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--itc-weight", type=float, default=0.1)
    ap.add_argument("--itc-sigma-scale", type=float, default=1.0,
                    help="train.itc_sigma_scale of the ITC arms: their ITC copy at σ × this (v7, v8: 1)")
    ap.add_argument("--max-minutes", type=float, default=8.0,
                    help="a guard per round of runs: a run still going then is stopped and scored where it is")
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--gpus", type=int, default=None, help="default: all visible")
    ap.add_argument("--encoders", default="bind",
                    help="model.encoders: a tiny-FLUX folder; 'bind' (default): the shipped one with its T5 trained to "
                         "bind (made in WORK/tiny-bind); 'shipped': the shipped random encoders (runs v1-v5)")
    ap.add_argument("--base", default=None,
                    help="an exported diffusers folder (e.g. a gpu_chain.sh stage's): every arm starts from its "
                         "transformer and uses its encoders (overrides --encoders)")
    ap.add_argument("--data-only", action="store_true", help="make the data sets and stop")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="per-block torch.compile (default: on with GPUs); the caches are warmed while data is made")
    ap.add_argument("--runs-per-gpu", type=int, default=0,
                    help="run the (arm, seed) runs in rounds of this many per GPU (0: all at once)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="train.compile_mode = reduce-overhead for the arms without ITC (1.6x on one run alone)")
    ap.add_argument("--ema-decay", type=float, default=0.995, help="score the EMA weights (0: the raw weights)")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="ablation.json files of calls that ran different arms: write their joint table and stop")
    ap.add_argument("--table-only", action="store_true",
                    help="write the table from --work's runs and scores, train and score nothing: for a call cut "
                         "short after some scores were written (runs of the chosen arms and seeds that left no folder "
                         "are left out)")
    a = ap.parse_args()
    if a.merge:
        write_table(merge([json.loads(Path(f).read_text()) for f in a.merge], a.merge), Path(a.out))
        return 0
    if a.table_only:
        work = Path(a.work)
        if not (work / "evals").is_dir():
            raise SystemExit(f"--table-only: {work} has no evals/ folder: no run of it was scored")
        runs = [(arm, seed) for arm in a.arms for seed in a.seeds if (work / "runs" / f"{arm}-s{seed}").is_dir()]
        scored = bool(a.base) or (work / "evals" / f"{BASE_ROW}-e{a.eval_seeds[0]}.json").is_file()
        a.encoders = a.base or a.encoders  # as a call with --base records them (the table's head names them)
        write_table(dict(args={k: v for k, v in vars(a).items()}, rows=work_rows(work, runs, None, scored),
                         table_only=True), Path(a.out))
        return 0
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    gpus = a.gpus if a.gpus is not None else torch.cuda.device_count()
    compile_ = a.compile if a.compile is not None else gpus > 0
    t0 = time.time()
    if a.base:
        if not (Path(a.base) / "model_index.json").is_file():
            raise SystemExit(f"--base {a.base}: not an exported diffusers folder (no model_index.json); export one "
                             "with `fluxtrain export --format diffusers`")
        a.encoders = a.base
    resolve_encoders(a, work)
    warm, key = start_warm_up(a, work, gpus) if compile_ and not a.data_only else ([], None)
    sets = sorted({ARMS[arm][0] for arm in a.arms})  # the data sets the chosen arms train on
    cleaning = make_data(work, a.num, a.chunks, a.resolution, only=tuple({d.replace("clean", "noisy") for d in sets}))
    if a.source == "cache":  # latents and embeddings once per data set: training steps skip PNG, VAE and text
        run_all([cache_cmd(a, work, d, a.resolution, gpu_env(i, gpus))
                 for i, d in enumerate(sets) if not (work / f"cache-{d}" / "manifest.json").is_file()])
    data_s = time.time() - t0
    print(f"data ready in {data_s:.0f}s: {cleaning}", flush=True)
    codes = [p.wait() for p in warm]
    if any(codes[:2]):
        compile_ = False  # a compiled run that can't start would cost every arm its score
        print(f"compiled warm-up failed (logs {work}/warm*.log): the runs train eagerly", flush=True)
    elif any(codes[2:]):
        a.cuda_graphs = False
        print(f"CUDA-graph warm-up failed (log {work}/warm2.log): default compile mode", flush=True)
    elif warm:
        print(f"compile caches warm after {time.time() - t0:.0f}s", flush=True)
        (work / WARM_STAMP).write_text(key)
    if a.data_only:
        return 0

    runs = [(arm, seed) for arm in a.arms for seed in a.seeds]
    if stale := fresh_runs(work, runs):
        print(f"removed {stale} runs an earlier call left in {work / 'runs'}: every run starts fresh", flush=True)
    cmds = []
    for i, (arm, seed) in enumerate(runs):
        data, itc = ARMS[arm]
        run = work / "runs" / f"{arm}-s{seed}"
        path = work / f"cache-{data}" if a.source == "cache" else work / data / "part*" / "*.tar"
        ov = train_args(a, path, run, seed, itc, compile_)
        cmds.append((PY + ov, {**gpu_env(i, gpus), "OMP_NUM_THREADS": "1"}, work / f"train-{arm}-s{seed}.log"))
    per_round = len(cmds) if not a.runs_per_gpu else max(1, gpus) * a.runs_per_gpu
    walls = []
    for r in range(0, len(cmds), per_round):  # rounds: at most runs_per_gpu runs share a GPU
        walls += run_all(cmds[r:r + per_round], timeout_s=60 * a.max_minutes)

    evals = []
    for i, (arm, seed) in enumerate(runs):
        ckpts = sorted((work / "runs" / f"{arm}-s{seed}" / "checkpoints").glob("step-*"))
        for es in a.eval_seeds:
            if ckpts:
                evals.append((eval_cmd(ckpts[-1], es, work / "evals" / f"{arm}-s{seed}-e{es}.json",
                                       ["--true-cfg", str(a.true_cfg), "--steps", str(a.eval_steps)]),
                              gpu_env(i, gpus),
                              work / f"eval-{arm}-s{seed}-e{es}.log"))
    if a.base:  # the starting point's own score (at its run's text length, resolution and guidance: fluxtrain.json)
        evals += [(eval_cmd(Path(a.base), es, work / "evals" / f"{BASE_ROW}-e{es}.json",
                            ["--true-cfg", str(a.true_cfg), "--steps", str(a.eval_steps)]),
                   gpu_env(len(runs), gpus), work / f"eval-{BASE_ROW}-e{es}.log") for es in a.eval_seeds]
    (work / "evals").mkdir(exist_ok=True)
    run_all(evals)

    rows = work_rows(work, runs, walls, bool(a.base))
    result = dict(args={k: v for k, v in vars(a).items()}, cleaning=cleaning, data_s=data_s, gpus=gpus, rows=rows,
                  card=torch.cuda.get_device_name(0) if gpus else "CPU")
    write_table(result, out)
    return 0


def work_rows(work: Path, runs: list[tuple[str, int]], walls: list | None, base: bool) -> list[dict]:
    """The table's rows from a work folder: each run's last step and loss (its metrics.jsonl) and its scores (evals/),
    and with `base` the base's row. walls None: the runs' wall times are unknown (a call cut short before its
    table: --table-only)."""
    rows = []
    for i, (arm, seed) in enumerate(runs):
        run = work / "runs" / f"{arm}-s{seed}"
        ms = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
        steps = max((m.get("step", 0) for m in ms if "loss" in m), default=0)
        loss = next((m["loss"] for m in reversed(ms) if "loss" in m), None)
        rows.append(score_row(arm, seed, steps, walls[i] if walls else None, loss, work / "evals"))
        print(json.dumps(rows[-1]), flush=True)
    if base:
        rows.append(score_row(BASE_ROW, "-", 0, 0.0, None, work / "evals"))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_table(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    (out / "ablation.md").write_text(table(result))
    print(table(result))


def score_row(arm: str, seed, steps: int, train_s: float, loss, evals: Path) -> dict:
    """One table row: the run's (or with seed "-", the base's) scores, averaged over its eval seeds."""
    stem = f"{arm}-s{seed}" if seed != "-" else arm
    scores = [json.loads(p.read_text()) for p in sorted(evals.glob(f"{stem}-e*.json"))]
    cx = [s["per_split"]["complex"]["pass"] for s in scores]
    sp = [s["per_split"]["simple"]["pass"] for s in scores]
    return dict(arm=arm, seed=seed, steps=steps, train_s=train_s, loss=loss,
                complex=statistics.mean(cx) if cx else None, simple=statistics.mean(sp) if sp else None,
                n_complex=sum(s["per_split"]["complex"]["n"] for s in scores))


def merge(parts: list[dict], names: list[str]) -> dict:
    """The joint result of calls that ran different arms or seeds; the base they all started from scored once."""
    rows = [r for p in parts for r in p["rows"] if r["arm"] != BASE_ROW]
    base = next((r for p in parts for r in p["rows"] if r["arm"] == BASE_ROW), None)
    bases = {p["args"].get("base") for p in parts}
    if len(bases) > 1:
        raise SystemExit(f"--merge: the calls started from different bases ({sorted(map(str, bases))}): their arms "
                         "are not comparable in one table")
    return {**parts[0], "rows": rows + ([base] if base else []), "merged": names}


def table(r: dict) -> str:
    by = {}
    for row in r["rows"]:
        by.setdefault(row["arm"], []).append(row)
    base = [x["complex"] for x in by.get("baseline", []) if x["complex"] is not None]
    base_m = statistics.mean(base) if base else None
    enc = r.get("args", {}).get("encoders")
    head = [f"Text encoders: {'the shipped random T5' if not enc else enc}", ""]
    lines = head + ["| arm | seeds | steps reached | train min | complex pass (per seed) | mean ± half-range "
                    "| gain vs baseline | simple pass |", "|---|---|---|---|---|---|---|---|"]
    for arm, rs in by.items():
        cx = [x["complex"] for x in rs if x["complex"] is not None]
        sp = [x["simple"] for x in rs if x["simple"] is not None]
        if not cx:
            lines.append(f"| {arm} | {len(rs)} | {[x['steps'] for x in rs]} | | no score | | | |")
            continue
        m, h = statistics.mean(cx), (max(cx) - min(cx)) / 2
        mins = "/".join("?" if x["train_s"] is None else f"{x['train_s'] / 60:.1f}" for x in rs)
        gain = f"{100 * (m - base_m):+.1f} pts" if base_m is not None and arm != "baseline" else "—"
        label = "base, not fine-tuned" if arm == BASE_ROW else arm
        lines.append(f"| {label} | {','.join(str(x['seed']) for x in rs)} | {'/'.join(str(x['steps']) for x in rs)} "
                     f"| {mins} "
                     f"| {' / '.join(f'{100 * c:.1f}%' for c in cx)} | {100 * m:.1f}% ± {100 * h:.1f} | {gain} "
                     f"| {100 * statistics.mean(sp):.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
