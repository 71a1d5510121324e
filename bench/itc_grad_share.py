"""How much of a training step's gradient ITC sets (issue #6): the model's gradient from the flow loss alone and from
the weighted ITC loss, on the same batches, through the trainer's own forward_backward.

    python bench/itc_grad_share.py --config configs/ablation-small.toml --model.pretrained BASE \
        --data.source synthetic --data.complex_frac 0.5 --train.batch_size 64 --train.itc_weight 0.1 --batches 4

Each batch is run twice with the same noise draws (they are keyed by sample index): with the ITC head's weight at 0
(the flow loss's gradient, g_flow) and at train.itc_weight (g_flow + w·g_itc). Their difference is ITC's part.
Reported per batch and as means: both norms, their ratio, their cosine, the unweighted ITC loss, and the weight
at which ITC's part would be 0.25, 0.5 and 1× the flow loss's. The v10 ablation's logged norms (0.21 with ITC at
0.1, 0.09 without) suggested ~2×. The head is fresh, as at the start of an arm, or (--head-steps N) first trained
alone on frozen features, as an arm's head is after some steps: a head that has learnt sends a larger gradient. One
process (CPU or one GPU); the gradient is the transformer's, before clipping.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float()
                      for p in params])


def shares(model, enc, data, cfg, device, itc, batches: int) -> list[dict]:
    """Per batch: |g_flow|, |w·g_itc|, their ratio and cosine, and the unweighted ITC loss."""
    from fluxtrain.train import forward_backward

    params = [p for p in model.parameters() if p.requires_grad]
    w, rows = itc.weight, []
    for _ in range(batches):
        batch = next(data)
        grads = []
        for weight in (0.0, w):
            itc.weight = weight
            model.zero_grad(set_to_none=True)
            itc.head.zero_grad(set_to_none=True)
            forward_backward(model, enc, batch, cfg, device, 0, 0, 1.0, itc)
            grads.append(flat_grad(params))
        itc.weight = w
        g_flow, g_itc = grads[0], grads[1] - grads[0]
        nf, ni = float(g_flow.norm()), float(g_itc.norm())
        rows.append({"flow_norm": nf, "itc_norm": ni, "ratio": ni / nf,
                     "cos": float(torch.nn.functional.cosine_similarity(g_flow, g_itc, dim=0)),
                     "itc_loss": float(itc.last)})
    return rows


def fit_head(model, enc, data, cfg, device, itc, steps: int, batches: int, lr: float) -> float:
    """Train the head alone for `steps` AdamW steps on frozen features of `batches` batches: the pooled image tokens
    of the empty-prompt forward at the trainer's σ draws, as ITC reads them. An arm's head learns beside the model
    for 1,000 steps; its gradient into the model grows as its loss falls. Returns the head's last loss."""
    from fluxtrain.itc import itc_loss
    from fluxtrain.train import forward_backward

    feats, texts = [], []

    class Grab:  # stands in for the ITC objective in forward_backward: keeps what ITC would read, trains nothing
        def forward(self, model, inputs, e_seq, e_pooled, caption_pooled, view=None):
            with torch.no_grad():
                feats.append(itc.features(model, inputs, e_seq, e_pooled, view).float())
                texts.append(caption_pooled.float())
            # no prediction is needed: a leaf of the prediction's shape keeps forward_backward's backward cheap
            return inputs["hidden_states"].detach().float().requires_grad_(), 0.0

    for _ in range(batches):
        forward_backward(model, enc, next(data), cfg, device, 0, 0, 1.0, Grab())
    opt = torch.optim.AdamW(itc.head.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss = itc_loss(itc.head, feats[step % batches], texts[step % batches], gather=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    itc.head.zero_grad(set_to_none=True)
    return float(loss.detach())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--out", default=None, help="JSON of the rows and means")
    ap.add_argument("--head-steps", type=int, default=0,
                    help="first train the head alone this many steps on frozen features (0: a fresh head)")
    ap.add_argument("--head-batches", type=int, default=4, help="batches of frozen features the head trains on")
    ap.add_argument("--head-lr", type=float, default=None, help="the head's lr (default optim.lr)")
    a, overrides = ap.parse_known_args(argv)
    from fluxtrain import config as C
    from fluxtrain.data.loader import build_loader
    from fluxtrain.itc import ITCObjective
    from fluxtrain.train import Encoders
    from one_process import training_model

    cfg = C.load(a.config, overrides)
    if cfg.train.itc_weight <= 0:
        raise SystemExit("train.itc_weight is 0: give the weight to measure, e.g. --train.itc_weight 0.1")
    with training_model(cfg, "itc_grad_share.py") as (D, model):
        data = build_loader(cfg, D.rank, D.world_size)
        enc = Encoders(cfg, D.device, data)
        itc = ITCObjective(model, D.mesh, model.config.pooled_projection_dim, cfg.train.itc_weight, cfg.optim,
                           1, D.device)
        batches = iter(data)
        head_loss = None
        if a.head_steps:
            head_loss = fit_head(model, enc, batches, cfg, D.device, itc, a.head_steps, a.head_batches,
                                 a.head_lr or cfg.optim.lr)
            print(f"head trained {a.head_steps} steps on {a.head_batches} batches of frozen features: "
                  f"ITC loss {head_loss:.3f}", flush=True)
        rows = shares(model, enc, batches, cfg, D.device, itc, a.batches)  # batches the head has not seen
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    w = cfg.train.itc_weight
    mean["weight_for_ratio"] = {str(r): w * r / mean["ratio"] for r in (0.25, 0.5, 1.0)}
    for i, r in enumerate(rows):
        print(f"batch {i}: |g_flow| {r['flow_norm']:.4f}  |{w}·g_itc| {r['itc_norm']:.4f}  ratio {r['ratio']:.2f}  "
              f"cos {r['cos']:+.3f}  itc_loss {r['itc_loss']:.3f}")
    print(f"mean: ratio {mean['ratio']:.2f} (ITC's part / the flow loss's) at weight {w}, cos {mean['cos']:+.3f}; "
          "weight for ratio " + ", ".join(f"{k}: {v:.4f}" for k, v in mean["weight_for_ratio"].items()))
    if a.out:
        Path(a.out).write_text(json.dumps({"weight": w, "head_steps": a.head_steps, "head_loss": head_loss,
                                           "rows": rows, "mean": mean}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
