"""Is an SDPA backend correct and how fast is it, at FLUX.1's attention shape? One JSON line per backend.

    python bench/attn_check.py [--batch 2] [--tokens 4608] [--backends flash cudnn efficient]

q, k, v are laid out as diffusers' FLUX attention makes them ((B, S, H, D) projections transposed to (B, H, S, D)),
and the output goes back through the same transpose, so the backward sees the strides it sees in training (the cuDNN
backward once failed there with `mha_graph.execute`). Errors of the output and of dq/dk/dv are relative to an fp32
math-backend reference (max-abs error ÷ max-abs reference): a backend is `ok` when each is within 2× flash's own error
(bf16 rounding), so a backend is only adopted when it is as accurate as the one in use. Time: fwd+bwd, median of 20.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAMES = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention(q, k, v):
    b, s, h, d = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, s, h * d)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(backend: str, q, k, v, gout, steps: int):
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([NAMES[backend]]):
        out = attention(qs, ks, vs)
        out.backward(gout)
        grads = [t.grad for t in (qs, ks, vs)]
        grads = [t.clone() for t in grads]
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            attention(qs, ks, vs).backward(gout)
            sync()
            times.append(time.perf_counter() - t0)
    return out.detach(), grads, statistics.median(times) if times else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4608, help="1024² image (4096) + 512 text tokens")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--backends", nargs="+", default=["flash", "cudnn", "efficient"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    dev = a.device
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (a.batch, a.tokens, a.heads, a.head_dim)
    q, k, v = (torch.randn(shape, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3))
    gout = torch.randn(a.batch, a.tokens, a.heads * a.head_dim, device=dev, generator=g, dtype=torch.bfloat16)
    ref_out, ref_grads, _ = run("math", q.float(), k.float(), v.float(), gout.float(), 0)
    flops = 4 * a.batch * a.heads * a.tokens**2 * a.head_dim * 3.5  # fwd 4·B·H·S²·D, bwd 2.5× fwd
    base = None
    for name in a.backends:
        try:
            out, grads, t = run(name, q, k, v, gout, a.steps)
        except Exception as err:  # a failing backend is a result, not the end of the check
            print(json.dumps({"backend": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}))
            continue
        errs = [float((x.float() - r).abs().max() / r.abs().max()) for x, r in zip([out] + grads, [ref_out] + ref_grads)]
        if name == "flash":
            base = errs
        ok = base is not None and all(e <= 2 * b + 1e-6 for e, b in zip(errs, base))
        print(json.dumps({"backend": name, "fwd_bwd_ms": round(1e3 * t, 2), "tflops": round(flops / t / 1e12, 1),
                          "rel_err_out_dq_dk_dv": [round(e, 5) for e in errs], "ok": ok}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
