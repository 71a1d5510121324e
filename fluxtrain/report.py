"""`fluxtrain report RUN_DIR [--out F.html]`: one self-contained HTML page about a run, finished or running.

Reads the run directory's contract files — metrics.jsonl (step rows and event lines), config.toml, samples/*.png —
and writes a single HTML file (default RUN_DIR/report.html) with no external references: every plot is a PNG drawn
by matplotlib's Agg canvas and embedded as base64, and so are the newest sample grids.

A running run is fine: a partially written last line of metrics.jsonl is skipped (and noted), steps re-run after a
resume are shown once (the later row wins), and the page is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fluxtrain.argtypes import output_file

SAMPLE_GRIDS = 2  # newest sample grids embedded
EMA_BETA = 0.9
MAX_EMBED_BYTES = 3 * 2**20  # sample grids larger than this are downscaled before embedding

CONFIG_EXCERPT = [
    ("model", "preset"), ("model", "pretrained"), ("data", "source"), ("data", "path"), ("data", "resolution"),
    ("train", "steps"), ("train", "batch_size"), ("train", "grad_accum"), ("train", "seed"), ("optim", "lr"),
    ("optim", "schedule"), ("optim", "warmup_steps"), ("parallel", "strategy"), ("parallel", "mixed_precision"),
    ("parallel", "activation_checkpointing"), ("parallel", "cpu_offload"), ("parallel", "fp8"),
    ("checkpoint", "interval"), ("log", "interval"),
]


@dataclass
class Run:
    rows: list[dict] = field(default_factory=list)  # one per step, sorted, later duplicates win
    events: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    config_text: str = ""


# ---------------------------------------------------------------- reading


def read_metrics(path: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Step rows (deduplicated by step, the last written wins) and event lines; unreadable lines are noted."""
    notes: list[str] = []
    if not path.exists():
        return [], [], [f"{path.name} not found: no step has been logged yet"]
    lines = path.read_text(errors="replace").split("\n")
    by_step: dict[int, dict] = {}
    events: list[dict] = []
    bad = 0
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
                raise ValueError("not a step record")
        except ValueError:
            if i == last:
                notes.append("the last line of metrics.jsonl is partially written (run in progress?): skipped")
            else:
                bad += 1
            continue
        if "event" in obj:
            events.append(obj)
        else:
            by_step[obj["step"]] = obj
    if bad:
        notes.append(f"{bad} unreadable line(s) in metrics.jsonl skipped")
    return [by_step[s] for s in sorted(by_step)], events, notes


def read_run(run_dir: Path) -> Run:
    rows, events, notes = read_metrics(run_dir / "metrics.jsonl")
    run = Run(rows=rows, events=events, notes=notes)
    cfg = run_dir / "config.toml"
    if cfg.exists():
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib

        run.config_text = cfg.read_text(errors="replace")
        try:
            run.config = tomllib.loads(run.config_text)
        except tomllib.TOMLDecodeError as err:
            run.notes.append(f"config.toml could not be parsed: {err}")
    else:
        run.notes.append("config.toml not found")
    return run


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records where `key` is a number (None, bools and strings are left out)."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, dict):
            v = v.get("overall")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def ema(values: list[float], beta: float = EMA_BETA) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing); non-finite values are skipped."""
    out, acc, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            n += 1
            acc = beta * acc + (1 - beta) * v
        out.append(acc / (1 - beta**n) if n else float("nan"))
    return out


def median(values: list[float]) -> float | None:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.median(vals) if vals else None


# ---------------------------------------------------------------- plotting


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mark_resumes(ax, events: list[dict]) -> None:
    for i, e in enumerate(e for e in events if e.get("event") == "resume"):
        ax.axvline(e["step"], color="grey", linestyle="--", linewidth=0.8, label="resume" if i == 0 else None)


def line_plot(run: Run, title: str, ylabel: str, keys: list[tuple[str, str]], log_y: bool = False,
              from_zero: bool = False) -> str | None:
    """One PNG (base64) with a line per key that has data, or None when none has."""
    data = [(label, *series(run.rows, key)) for key, label in keys]
    data = [d for d in data if d[1]]
    if not data:
        return None
    fig, ax = _figure(title, ylabel)
    for label, xs, ys in data:
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
    if log_y and all(v > 0 for _, _, ys in data for v in ys if math.isfinite(v)):
        ax.set_yscale("log")
    elif from_zero:
        ax.set_ylim(bottom=0)
    _mark_resumes(ax, run.events)
    if len(keys) > 1 or any(e.get("event") == "resume" for e in run.events):
        ax.legend()
    return _png(fig)


def loss_plot(run: Run) -> str | None:
    xs, ys = series(run.rows, "loss")
    if not xs:
        return None
    fig, ax = _figure("training loss", "loss")
    ax.plot(xs, ys, alpha=0.35, label="raw")
    ax.plot(xs, ema(ys), linewidth=2, label=f"EMA ({EMA_BETA})")
    _mark_resumes(ax, run.events)
    ax.legend()
    return _png(fig)


def text_plot(title: str, text: str) -> str:
    fig, ax = _figure(title, "")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=18, color="grey", transform=ax.transAxes)
    return _png(fig)


def event_plot(records: list[dict], key: str, title: str, ylabel: str, last_step: int | None) -> str | None:
    """Values at sparse steps (checkpoint stalls, eval scores) as stems over the whole run's step range."""
    xs, ys = series(records, key)
    if not xs:
        return None
    fig, ax = _figure(title, ylabel)
    ax.vlines(xs, 0, ys, alpha=0.5)
    ax.plot(xs, ys, "o")
    ax.set_xlim(0, max([*xs, last_step or 0]) * 1.03 + 1)
    ax.set_ylim(bottom=0)
    return _png(fig)


# ---------------------------------------------------------------- page


def _fmt(v, unit: str = "", digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}{unit}"
    return f"{v}{unit}"


def summary(run: Run) -> list[tuple[str, str]]:
    rows = run.rows
    total = run.config.get("train", {}).get("steps")
    last_step = rows[-1]["step"] if rows else None
    if last_step is None:
        status = "no steps logged yet"
    elif isinstance(total, int) and last_step >= total:
        status = "finished"
    else:
        status = f"running or stopped (step {last_step} of {total if total is not None else '?'})"
    losses = series(rows, "loss")[1]
    mfu = median(series(rows, "mfu")[1])
    gpu_peak = [v for k in ("mem_peak_gib", "mem_gib") for v in series(rows, k)[1]]
    host = series(rows, "host_rss_gib")[1]
    stalls = series([e for e in run.events if e.get("event") == "checkpoint"], "stall_s")[1]
    times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
    out = [
        ("status", status),
        ("steps", f"{_fmt(last_step)} / {_fmt(total)}"),
        ("last loss", _fmt(losses[-1] if losses else None)),
        ("min loss (EMA)", _fmt(min((v for v in ema(losses) if math.isfinite(v)), default=None))),
        ("median samples/s", _fmt(median(series(rows, "samples_per_s")[1]))),
        ("median tokens/s", _fmt(median(series(rows, "tokens_per_s")[1]))),
        ("median TFLOP/s per GPU", _fmt(median(series(rows, "tflops_per_gpu")[1]))),
        ("median MFU", f"{100 * mfu:.1f}%" if mfu is not None else "n/a on CPU"),
        ("peak GPU memory", _fmt(max(gpu_peak) if gpu_peak else None, " GiB")),
        ("peak host RSS", _fmt(max(host) if host else None, " GiB")),
        ("checkpoints", f"{len(stalls)} (stall total {_fmt(sum(stalls), ' s')})" if stalls else "0"),
        ("data skipped", _fmt(rows[-1].get("data_skipped") if rows else None)),
        ("wall clock (logged)", _fmt((times[-1] - times[0]) / 60, " min", 3) if len(times) > 1 else "n/a"),
    ]
    return out


def newest_samples(run_dir: Path, n: int = SAMPLE_GRIDS) -> list[Path]:
    def key(p: Path):
        m = re.search(r"(\d+)", p.stem)
        return (int(m.group(1)) if m else -1, p.stat().st_mtime, p.name)

    files = [p for p in (run_dir / "samples").glob("*.png") if p.is_file()]
    return sorted(files, key=key)[-n:][::-1]


def embed_png(path: Path) -> str:
    data = path.read_bytes()
    if len(data) > MAX_EMBED_BYTES:
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        img.thumbnail((1600, 1600))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
    return base64.b64encode(data).decode("ascii")


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 900px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 2px 12px 2px 0; text-align: left; }
th { font-weight: 600; color: #555; } img { max-width: 100%; display: block; margin: 0.4em 0; }
.note { color: #777; font-style: italic; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; }
"""


def render(run_dir: Path, run: Run) -> str:
    e = html.escape
    parts: list[str] = []

    def section(title: str, png: str | None, note: str | None = None, sid: str = "") -> None:
        parts.append(f'<section id="{sid}"><h2>{e(title)}</h2>')
        if png:
            parts.append(f'<img alt="{e(title)}" src="data:image/png;base64,{png}">')
        if note:
            parts.append(f'<p class="note">{e(note)}</p>')
        parts.append("</section>")

    no_data = "no data logged yet"
    rows, events = run.rows, run.events
    ckpts = [ev for ev in events if ev.get("event") == "checkpoint"]
    section("Loss", loss_plot(run), None if series(rows, "loss")[0] else no_data, "loss")
    section("Learning rate", line_plot(run, "learning rate", "lr", [("lr", "lr")]),
            None if series(rows, "lr")[0] else no_data, "lr")
    section("Gradient norm", line_plot(run, "gradient norm (before clipping)", "grad norm",
                                       [("grad_norm", "grad norm")], log_y=True),
            None if series(rows, "grad_norm")[0] else no_data, "grad-norm")
    section("Throughput", line_plot(run, "throughput", "samples/s", [("samples_per_s", "samples/s")]),
            None if series(rows, "samples_per_s")[0] else no_data, "throughput")
    if series(rows, "mfu")[0]:
        section("MFU", line_plot(run, "model FLOPs utilisation", "MFU", [("mfu", "MFU")]), None, "mfu")
    elif rows:
        section("MFU", text_plot("model FLOPs utilisation", "n/a on CPU"),
                "MFU n/a on CPU: no datasheet peak for this device (every logged mfu is null)", "mfu")
    else:
        section("MFU", None, no_data, "mfu")
    mem_keys = [("mem_gib", "GPU allocated"), ("mem_peak_gib", "GPU peak"), ("mem_reserved_gib", "GPU reserved"),
                ("host_rss_gib", "host RSS")]
    section("Memory", line_plot(run, "memory", "GiB", mem_keys, from_zero=True),
            None if any(series(rows, k)[0] for k, _ in mem_keys) else no_data, "memory")
    section("Data-loader wait", line_plot(run, "data-loader wait per step", "s", [("data_wait_s", "wait")]),
            None if series(rows, "data_wait_s")[0] else no_data, "data-wait")
    last_step = rows[-1]["step"] if rows else None
    section("Checkpoint stalls", event_plot(ckpts, "stall_s", "checkpoint stall (training blocked)", "s", last_step),
            None if series(ckpts, "stall_s")[0] else "no checkpoint written yet", "checkpoints")
    adherence = series(rows + events, "adherence")
    section("Prompt adherence",
            event_plot(sorted(rows + events, key=lambda r: r["step"]), "adherence", "prompt adherence", "score",
                       last_step)
            if adherence[0] else None,
            None if adherence[0] else "no adherence measured in this run (eval.adherence_prompts = 0)", "adherence")

    parts.append('<section id="samples"><h2>Latest sample grids</h2>')
    samples = newest_samples(run_dir)
    for p in samples:
        parts.append(f'<figure><img alt="{e(p.name)}" src="data:image/png;base64,{embed_png(p)}">'
                     f"<figcaption>{e(p.name)}</figcaption></figure>")
    if not samples:
        parts.append('<p class="note">no sample grid yet (samples/*.png)</p>')
    parts.append("</section>")

    excerpt = [(f"{sec}.{key}", run.config[sec][key]) for sec, key in CONFIG_EXCERPT
               if key in run.config.get(sec, {})]
    summary_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary(run))
    config_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in excerpt)
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in run.notes)
    full_cfg = (f"<details><summary>config.toml</summary><pre>{e(run.config_text)}</pre></details>"
                if run.config_text else "")
    head = (f'<h1>fluxtrain report: {e(run_dir.resolve().name)}</h1>'
            f'<p class="note">{e(str(run_dir.resolve()))}, generated {e(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>'
            f'{notes}<div class="cols"><div><h2>Summary</h2><table id="summary">{summary_rows}</table></div>'
            f'<div><h2>Config</h2><table id="config">{config_rows}</table></div></div>{full_cfg}')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fluxtrain report: '
            f"{e(run_dir.resolve().name)}</title><style>{CSS}</style></head><body>{head}"
            + "\n".join(parts) + "</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    page = render(run_dir, read_run(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)  # a browser reloading a running run's report never sees half a page
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fluxtrain report",
                                 description="HTML report (loss, throughput, memory plots, sample grids) of a run")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="the run's train.output_dir")
    ap.add_argument("--out", type=output_file, metavar="F.html", help="output file (default RUN_DIR/report.html)")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"fluxtrain: error: {run_dir} is not a folder (give the run's train.output_dir)", file=sys.stderr)
        return 2
    if not any((run_dir / f).is_file() for f in ("metrics.jsonl", "config.toml")):
        print(f"fluxtrain: error: {run_dir} is not a run folder (no metrics.jsonl or config.toml): give the run's "
              "train.output_dir", file=sys.stderr)
        return 2
    out = write_report(run_dir, args.out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
