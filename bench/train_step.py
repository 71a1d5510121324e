"""Time FLUX training steps: one table row per variant (step time, samples/s/GPU, TFLOP/s/GPU, MFU, peak memory).

    torchrun --nproc_per_node 2 bench/train_step.py --preset flux-dev --resolution 1024 --batch 1 \
        --variants "ac=full" "ac=full,compile=1" "ac=selective,ac_every=2" "ac=none,compile=1"

Each variant is `key=value` pairs over: ac (none|full|selective), ac_every, ac_ops, compile (0|1), strategy,
offload (0|1), ooff (0|1: parallel.optimizer_offload), obuf (its ring, GiB), odt (fp32|bf16: its moments), mp (bf16|fp32), attn (flash|efficient|cudnn|math|auto),
fp8 (0|1), fp8_recipe (tensorwise|rowwise|…), fp8_ag (0|1), batch, prefetch, rep (a label for a repeated variant),
lora (rank; frozen bf16 base). All variants run in
one process launch (model rebuilt per variant, on the meta device, random weights), so rows compare on one machine.
Inputs are random latents and text embeddings (frozen encoders are off the hot path: `data.source = cache`).
MFU uses the analytic FLUX FLOPs (fluxtrain.metrics.flux_flops_per_sample) and the 989 TFLOP/s H100/H200 peak.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxtrain import config as C  # noqa: E402
from fluxtrain import flow  # noqa: E402
from fluxtrain.metrics import flux_flops_per_sample, peak_tflops  # noqa: E402
from fluxtrain.models.setup import build_training_model, model_kwargs  # noqa: E402
from fluxtrain.optim import build_optimizer, build_scheduler, flush  # noqa: E402
from fluxtrain.parallel import set_cpu_threads  # noqa: E402
from fluxtrain.train import clip_and_step  # noqa: E402
from fluxtrain.parallel import mesh as pmesh  # noqa: E402

def variant_config(base: list[str], spec: dict) -> C.Config:
    ov = list(base)
    m = {"ac": "parallel.activation_checkpointing", "ac_every": "parallel.ac_every", "ac_ops": "parallel.ac_ops",
         "compile": "train.compile", "strategy": "parallel.strategy", "offload": "parallel.cpu_offload",
         "mp": "parallel.mixed_precision", "batch": "train.batch_size", "prefetch": "parallel.forward_prefetch", "bprefetch": "parallel.backward_prefetch",
         "reshard_last": "parallel.reshard_last_block", "fp8": "parallel.fp8", "attn": "model.attention_backend",
         "fp8_recipe": "parallel.fp8_recipe", "fp8_ag": "parallel.fp8_all_gather",
         "ooff": "parallel.optimizer_offload", "obuf": "parallel.optimizer_offload_buffer_gib",
         "odt": "parallel.optimizer_offload_dtype"}
    for k, v in spec.items():
        if k not in m and k not in ("lora", "rep"):  # rep=N only labels a repeated variant
            raise SystemExit(f"unknown variant key {k!r}; known: {', '.join(sorted([*m, 'lora', 'rep']))}")
        if k == "lora":  # LoRA of this rank on a frozen bf16 base
            ov += ["--lora.enabled", "true", "--lora.rank", v, "--lora.alpha", v, "--lora.base_dtype", "bf16"]
        if k in m:
            flags = ("compile", "offload", "ac_ops", "reshard_last", "fp8", "fp8_ag", "ooff")
            v = {"0": "false", "1": "true"}.get(v, v) if k in flags else v
            ov += [f"--{m[k]}", v]
    return C.load(None, ov)


def profile_steps(D, args, train_step, sync, spec: dict) -> dict | None:
    """Three more steps, the last two under torch.profiler on rank 0 (the first warms the profiler up; the other ranks
    step alongside): the trace goes to --profile, and `fluxtrain trace`'s summary (GPU busy, kernel time by kind,
    exposed communication) into the row."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from fluxtrain.trace_summary import load, summarize

    if not D.is_main:
        for _ in range(3):
            train_step()
            sync()
        return None
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if D.device.type == "cuda" else [])
    with profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=2, repeat=1)) as prof:
        for _ in range(3):
            train_step()
            sync()
            prof.step()
    path = Path(args.profile) / f"trace-{'_'.join(f'{k}{v}' for k, v in spec.items()) or 'default'}.json.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return summarize(load(path))


def live_tensors(device_type: str, min_bytes: int, limit: int = 5) -> list[str]:
    """The largest storages on `device_type` that Python still reaches, each with what refers to its tensors (and,
    for a dict, whose dict it is): a hunt for what keeps an earlier variant's memory allocated."""
    gc.collect()
    found: dict[int, tuple[int, list]] = {}
    with warnings.catch_warnings():  # touching every object wakes deprecated module attributes' warnings
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [o for o in objects if isinstance(o, torch.Tensor)]
    del objects
    for o in tensors:
        try:
            if o.device.type != device_type:
                continue
            st = (o._local_tensor if hasattr(o, "_local_tensor") else o).untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
        except Exception:  # tensor subclasses without a storage, fake or meta tensors
            continue
        if n >= min_bytes:
            found.setdefault(ptr, (n, []))[1].append(o)
    mine = {id(found), id(tensors)} | {id(v) for v in found.values()} | {id(v[1]) for v in found.values()}

    def who(r) -> str:
        if isinstance(r, dict):
            owners = [type(x).__name__ for x in gc.get_referrers(r) if getattr(x, "__dict__", None) is r]
            mods = [m.__name__ for m in list(sys.modules.values()) if getattr(m, "__dict__", None) is r]
            return f"dict of {(mods or owners or ['?'])[0]}"
        return type(r).__name__

    lines = []
    for n, tensors in sorted(found.values(), key=lambda v: -v[0])[:limit]:
        t = tensors[0]
        refs = {who(r) for x in tensors for r in gc.get_referrers(x) if id(r) not in mine and r is not tensors}
        lines.append(f"  {n / 2**20:.0f} MiB {tuple(t.shape)} {t.dtype} ({len(tensors)} tensors): held by "
                     f"{', '.join(sorted(refs)) or 'nothing Python sees'}")
    return lines or ["  none: the holder is outside Python (C++ state, an autograd graph, a communicator)"]


def leftover_stacks(limit: int = 3, depth: int = 8) -> list[str]:
    """With CUDA allocation history on (--memory-history): the still-allocated blocks grouped by where they were
    allocated, largest total first. The leftover of an earlier variant is out of Python's reach (live_tensors finds
    none of it), so where it was allocated is the clue to what holds it."""
    groups: dict[tuple, list] = {}
    for seg in torch.cuda.memory._snapshot().get("segments", []):
        for b in seg.get("blocks", []):
            if b.get("state") != "active_allocated":
                continue
            frames = b.get("frames") or ((b.get("history") or [{}])[-1].get("frames") or [])
            key = tuple(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames
                        if f.get("filename", "").endswith(".py"))[:depth]
            g = groups.setdefault(key, [0, 0])
            g[0] += b.get("size", 0)
            g[1] += 1
    lines = []
    for key, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:limit]:
        where = " < ".join(key) or "(no Python frames)"
        lines.append(f"  {size / 2**30:.2f} GiB in {n} blocks, allocated at: {where}")
    return lines


def paced_step(median: float, wall: float, optimizer_offload: bool) -> float:
    """The step time a row's rates use. The median of per-step times synced on the compute stream, except with an
    offloaded optimizer: its copies can run past that sync, and the 12B on one GPU showed a median of 0.975 s against
    2.806 s per step with every stream drained (thirteenth session). Then the drained rate, which carries the last
    step's copies (a bound from above, by at most one step's copies over the timed steps)."""
    return max(median, wall) if optimizer_offload else median


def run_variant(D, args, spec: dict) -> dict:
    cfg = variant_config(args.base, {"attn": args.attn, **spec})
    threads = set_cpu_threads(cfg)  # the offloaded optimizer's threads, as the trainer sets them
    cuda = D.device.type == "cuda"
    # the compute stream only: it ends each step with FSDP's reduce-scatters and the optimizer waited for, while
    # an offloaded optimizer's copies (parallel.optimizer_offload) may run on into the next step's forward, as in training
    sync = (lambda: torch.cuda.current_stream().synchronize()) if cuda else (lambda: None)
    if cuda:
        # The earlier variant's weights (its fp32 shards: 11.1 GiB per GPU at 12B on 4) stayed counted as allocated
        # in blocks the snapshot calls inactive, through the cleanup at its end, until this variant's first
        # allocations; a synchronize, then gc and empty_cache, here returns them (1 H200, sixteenth session: 4.9 GiB
        # → 0.06)
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # what an earlier variant of the launch still leaves allocated (none expected after the above): subtracted, so
    # `peak_gib` is this variant's own; `peak_raw_gib` is not
    left_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    if D.is_main and left_gib > 0.5:  # who holds it, if Python does (none listed: a holder outside Python's reach)
        print(f"variant {spec}: {left_gib:.1f} GiB left allocated by the last one; the largest tensors Python reaches:\n"
              + "\n".join(live_tensors("cuda", 2**26)), flush=True)
        if args.memory_history:
            states: dict[str, int] = {}
            for seg in torch.cuda.memory._snapshot().get("segments", []):
                for blk in seg.get("blocks", []):
                    states[blk.get("state")] = states.get(blk.get("state"), 0) + blk.get("size", 0)
            print("leftover by block state (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in states.items()), flush=True)
            try:
                print("where the leftover was allocated:\n" + "\n".join(leftover_stacks()), flush=True)
            except Exception as err:  # a diagnostic: never the end of the run
                print(f"leftover_stacks failed: {err!r}", flush=True)
    t_init = time.perf_counter()
    model = build_training_model(cfg, D.mesh, D.device)
    opt = build_optimizer(model.parameters(), cfg.optim, model if cfg.parallel.optimizer_offload else None, cfg.parallel)
    sched = build_scheduler(opt, 1000, cfg.optim)
    init_s = time.perf_counter() - t_init
    # what is resident before the first step (weights, shards, LoRA) vs after the last: where a peak comes from
    init_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    kw = model_kwargs(cfg)
    b = cfg.train.batch_size
    lat = args.resolution // args.vae_factor
    img_tok, txt_tok = (lat // 2) ** 2, args.text_tokens
    g = torch.Generator(device=D.device).manual_seed(D.rank)
    x0 = torch.randn(b, img_tok, kw["in_channels"], device=D.device, generator=g)
    noise = torch.randn_like(x0)
    seq = torch.randn(b, txt_tok, kw["joint_attention_dim"], device=D.device, generator=g)
    pooled = torch.randn(b, kw["pooled_projection_dim"], device=D.device, generator=g)

    def train_step() -> torch.Tensor:
        sigma = torch.rand(b, device=D.device, generator=g)
        x_t = flow.noisy_input(x0, noise, sigma)
        pred = model(**flow.transformer_inputs(x_t, sigma, seq, pooled, lat, lat, 1.0))[0]
        loss = flow.flow_loss(pred, flow.target(x0, noise), sigma)
        loss.backward()
        if args.phases:  # the split of the step: forward+backward vs clip+optimizer (a sync between them)
            sync()
            marks.append(time.perf_counter())
        _, ok = clip_and_step(model, opt, sched, 1.0, cfg)  # the trainer's clip and step, as it runs them
        skipped.append(not ok)
        return loss

    times, losses, marks, fwd_bwd, warm_losses, skipped = [], [], [], [], [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        if i == args.warmup:
            t_timed = t0
        loss = train_step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if args.phases:
                fwd_bwd.append(marks[-1] - t0)
        else:
            warm_losses.append(float(loss.detach()))
    # every stream drained (an offloaded optimizer's copies may run past the compute stream's sync): a bound from
    # above on the pace the timed steps sustained (it carries the last step's trailing copies)
    if cuda:
        torch.cuda.synchronize()
    wall_step = (time.perf_counter() - t_timed) / args.steps
    skips = sum(skipped[args.warmup:])  # the timed steps' (the profiled ones follow)
    profile = profile_steps(D, args, train_step, sync, spec) if args.profile else None
    median = statistics.median(times)
    step = paced_step(median, wall_step, cfg.parallel.optimizer_offload)
    steady_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    t = torch.tensor([step], device=D.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    step = float(t)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 - left_gib if cuda else 0.0], device=D.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
    fps = flux_flops_per_sample(kw, img_tok, txt_tok)
    tflops = b * fps / step / 1e12
    pk = peak_tflops(D.device) or float("nan")
    row = dict(variant=",".join(f"{k}={v}" for k, v in spec.items()) or "default", gpus=D.world_size, batch=b,
               step_s=step, median_step_s=median, wall_step_s=wall_step, skipped=skips,
               samples_s_gpu=b / step, tflops_gpu=tflops, mfu=tflops / pk, peak_gib=float(peak),
               reserved_gib=reserved, cpu_threads=threads, init_s=init_s, init_gib=init_gib - left_gib,
               steady_gib=steady_gib - left_gib, left_gib=left_gib, peak_raw_gib=float(peak) + left_gib,
               host_peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # the process's so far
               loss_first=losses[0], loss_last=losses[-1], step_times=[round(x, 4) for x in times],
               warmup_losses=[round(x, 4) for x in warm_losses])
    if args.losses:
        row["losses"] = losses
    if profile:
        row["profile"] = profile
    if fwd_bwd:
        row["fwd_bwd_s"] = statistics.median(fwd_bwd)
        row["clip_step_s"] = statistics.median(t - f for t, f in zip(times, fwd_bwd))
    flush(opt)  # an offloaded optimizer's copies still running would write into the next variant's memory
    del model, opt, sched, x0, noise, seq, pooled  # the scheduler holds the optimizer too
    # Compiled graphs keep the variant's model alive (22 GiB of sharded 12B weights per GPU were still resident in
    # the next variant): drop them, so each row's peak is its own.
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flux-dev")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vae-factor", type=int, default=8, help="VAE downsampling (8 for FLUX; 4 for tiny)")
    ap.add_argument("--attn", default="flash")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variants", nargs="+", default=["ac=full"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="append the markdown rows here (default: print only)")
    ap.add_argument("--depth", default=None, help="DOUBLE,SINGLE: the preset's width with this many blocks (numerics "
                                                  "runs of many steps, e.g. fp8 vs bf16)")
    ap.add_argument("--losses", default=None, help="write every timed step's loss per variant to this JSON file")
    ap.add_argument("--profile", default=None, help="profile 2 extra steps per variant: traces to this folder, "
                                                     "their summary into the row")
    ap.add_argument("--phases", action="store_true", help="also time forward+backward and clip+optimizer step apart "
                                                          "(a sync between them)")
    ap.add_argument("--memory-history", action="store_true",
                    help="record where CUDA memory is allocated (slower allocations): a variant that starts with an "
                         "earlier one's memory still allocated prints where that was allocated")
    args = ap.parse_args()
    if args.memory_history and torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    if args.depth:  # the preset's shape with fewer blocks: every later lookup of the preset sees it
        from fluxtrain.models.presets import PRESETS

        d, sgl = (int(x) for x in args.depth.split(","))
        PRESETS[args.preset] = {**PRESETS[args.preset], "num_layers": d, "num_single_layers": sgl}
    args.base = ["--model.preset", args.preset, "--data.resolution", str(args.resolution),
                 "--train.batch_size", str(args.batch), "--model.max_text_tokens", str(args.text_tokens),
                 "--train.device", args.device, "--optim.fused", "true"]
    base_cfg = C.load(None, args.base)
    for v in args.variants:  # a typo in a variant fails here, before any process group or model
        variant_config(args.base, dict(kv.split("=", 1) for kv in v.split(",") if kv))
    D = pmesh.init(base_cfg)
    card = torch.cuda.get_device_name(D.device) if D.device.type == "cuda" else "CPU"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for v in args.variants:
        spec = dict(kv.split("=", 1) for kv in v.split(",") if kv)
        try:
            row = run_variant(D, args, spec)
        except Exception as err:  # a failed variant (OOM, compile error) is a row, not the end of the run
            kind = "OOM" if isinstance(err, torch.OutOfMemoryError) else f"{type(err).__name__}: {str(err).splitlines()[-1][:120]}"
            row = dict(variant=v, gpus=D.world_size, batch=args.batch, error=kind)
            if D.is_main:
                print(f"variant {v} failed:\n{str(err)[:3000]}", flush=True)
            torch._dynamo.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
        if D.is_main:
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        if D.is_main and args.losses:  # after every variant: a run cut short keeps what it measured
            Path(args.losses).write_text(json.dumps({r["variant"]: r.get("losses") for r in rows}))
    if D.is_main:
        date = datetime.date.today().isoformat()
        head = (f"\n### {date} · {card} × {D.world_size} · commit {commit} · {args.preset} {args.resolution}² "
                f"+ {args.text_tokens} text tokens, batch {args.batch}/GPU, attn {args.attn}\n\n"
                f"`{' '.join(['torchrun', '--nproc_per_node', str(D.world_size)] + sys.argv)}`\n\n"
                "| variant | step s | samples/s/GPU | TFLOP/s/GPU | MFU | peak GiB | loss first→last |\n"
                "|---|---|---|---|---|---|---|\n")
        lines = []
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['error']} | | | | | |")
            else:
                lines.append(f"| {r['variant']} | {r['step_s']:.3f} | {r['samples_s_gpu']:.3f} | {r['tflops_gpu']:.0f} "
                             f"| {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {r['loss_first']:.3f}→{r['loss_last']:.3f} |")
        text = head + "\n".join(lines) + "\n"
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text)
    pmesh.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
