"""Per-block cost of an attention backend inside the real FLUX block, one GPU, no FSDP: where a backend that is
faster in isolation (bench/attn_check.py) loses in the 12B run, this shows whether it is time or memory per block.

    python bench/block_probe.py --double 1 --single 2 --batch 2 --variants flash,ops cudnn,ops flash,none cudnn,none

The first variant is the numerics reference: every later row gives its first step's output and gradient errors
relative to it (`dcudnn` is diffusers' own cuDNN backend, `cudnn` fluxtrain's opaque op).

Each variant: the flux-dev width with --double/--single blocks, bf16, per-block compile (unless `,eager`), AC mode
(ops = op-level selective, none, full), optionally fp8 linears (`,fp8=RECIPE`: parallel.fp8_recipe's names;
`,noag`: weights without torchao's fp8 all-gather subclass), random inputs at --resolution (1024²) + 512 text
tokens; prints fwd+bwd median time and the peak memory
above the weights (what the saved activations cost per block).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxtrain import config as C  # noqa: E402
from fluxtrain import flow  # noqa: E402
from fluxtrain.models.flux import build_transformer  # noqa: E402
from fluxtrain.models.presets import transformer_kwargs  # noqa: E402
from fluxtrain.parallel.activation_checkpoint import apply_ac  # noqa: E402
from fluxtrain.parallel.compile import apply_compile  # noqa: E402
from fluxtrain.parallel.attention import apply_attention_backend  # noqa: E402

try:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    DIFFUSERS_CUDNN = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_CUDNN]  # before fluxtrain's
except ImportError:
    DIFFUSERS_CUDNN = None


def probe(kw: dict, attn: str, ac: str, batch: int, text: int, steps: int, device: str, lat: int,
          compiled: bool = True, ref: dict | None = None, fp8: str | None = None, fp8_ag: bool = True) -> dict:
    torch.manual_seed(0)
    model = build_transformer(kw, device=device).to(torch.bfloat16)
    p = C.ParallelConfig(activation_checkpointing="selective" if ac == "ops" else ac, ac_ops=ac == "ops",
                         fp8=fp8 is not None, fp8_recipe=fp8 or "tensorwise")  # tensorwise_saved: its AC policy
    apply_attention_backend(model, "cudnn" if attn == "dcudnn" else attn, device, "bf16")
    if attn == "dcudnn":  # diffusers' own cuDNN backend, not fluxtrain's opaque op
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
        _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_CUDNN] = DIFFUSERS_CUDNN
    if fp8:
        from fluxtrain.parallel.fp8 import apply_fp8

        apply_fp8(model, fp8, fp8_ag)
    apply_ac(model, p)
    if compiled and device == "cuda":
        apply_compile(model)
    x = torch.randn(batch, (lat // 2) ** 2, kw["in_channels"], device=device, dtype=torch.bfloat16)
    seq = torch.randn(batch, text, kw["joint_attention_dim"], device=device, dtype=torch.bfloat16)
    pooled = torch.randn(batch, kw["pooled_projection_dim"], device=device, dtype=torch.bfloat16)
    sigma = torch.rand(batch, device=device)
    times, check = [], {}
    for i in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
            if i == 2:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = model(**flow.transformer_inputs(x, sigma, seq, pooled, lat, lat, 1.0))[0]
        out.float().square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == 0 and ref is not None:  # numerics of the first step, against the reference variant's
            check = compare(out, model, ref)
        model.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else 0.0
    return dict(attn=attn, ac=ac, batch=batch, fwd_bwd_s=round(statistics.median(times[2:]), 4),
                activation_peak_gib=round(peak, 3), **check)


def compare(out: torch.Tensor, model: torch.nn.Module, ref: dict) -> dict:
    """Relative errors of the output and of all gradients vs the reference's (the first variant's, stored in ref on
    its first call), and whether any is non-finite."""
    grads = [p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None]
    g = torch.cat(grads)
    o = out.detach().float()
    if not ref:
        ref.update(out=o.clone(), grad=g.clone())
        return dict(finite=bool(torch.isfinite(o).all() and torch.isfinite(g).all()))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return dict(finite=bool(torch.isfinite(o).all() and torch.isfinite(g).all()),
                out_rel_err=round(rel(o, ref["out"]), 5), grad_rel_err=round(rel(g, ref["grad"]), 5))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--preset", default="flux-dev")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", nargs="+", default=["flash,ops", "cudnn,ops", "flash,none", "cudnn,none"])
    a = ap.parse_args()
    kw = {**transformer_kwargs(a.preset), "num_layers": a.double, "num_single_layers": a.single}
    ref: dict = {}  # the first variant is the numerics reference
    for v in a.variants:
        attn, ac, *mode = v.split(",")
        fp8 = next((m.removeprefix("fp8=") for m in mode if m.startswith("fp8=")), None)
        try:
            row = probe(kw, attn, ac, a.batch, a.text_tokens, a.steps, a.device, a.resolution // 8,
                        "eager" not in mode, ref, fp8, "noag" not in mode)
            row.update(compile="eager" not in mode, fp8=fp8, fp8_all_gather=fp8 is not None and "noag" not in mode)
        except Exception as err:  # a failing variant is a row: the error's first and last lines
            lines = [ln for ln in str(err).splitlines() if ln.strip()] or [""]
            row = dict(attn=attn, ac=ac, mode=mode,
                       error=f"{type(err).__name__}: {lines[0][:200]} … {lines[-1][:300]}")
            print("\n".join(lines[:40])[:4000], file=sys.stderr)  # inductor puts the cause mid-message
        print(json.dumps(row), flush=True)
        torch._dynamo.reset()  # else the next variant may reuse this one's graphs (and keep its model alive)
        if a.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
