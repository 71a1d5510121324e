"""Does a trained model fit the scenes it trained on better than fresh ones of the same generator? (#6)

    python bench/memorization.py --config configs/ablation-small.toml --model.pretrained BASE \
        --seen 'SEEN/part*/*.tar' --fresh 'FRESH/part*/*.tar' --train.batch_size 64 --batches 8

A chain stage trains ~9,000 steps of 256 on ~25,600 cleaned scenes: each is seen ~90 times, while the held-out
prompts are captions it never saw. Here the same model's flow loss is taken on batches of both shard sets through
the trainer's own forward_backward, paired: batch i of each set gets the same sample ids, so the same σ and noise
draws, and the difference of the two losses is the scenes' alone. Caption dropout is off. A fresh-minus-seen gap far
above its standard error says the model fits its training scenes better than new ones (memorisation), and more
scenes per stage would be the lever; a gap near 0 says it does not. One process (CPU or one GPU).
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


def paired_losses(model, enc, sets: dict, cfg, device, batches: int) -> list[dict]:
    """Per batch i: each set's flow loss with the same sample ids (0..B-1 + i·B) for every set."""
    from fluxtrain.train import forward_backward

    its = {name: iter(loader) for name, loader in sets.items()}
    rows = []
    for i in range(batches):
        row = {}
        for name, it in its.items():
            batch = next(it)
            b = len(batch["indices"])
            batch["indices"] = torch.arange(i * b, (i + 1) * b, dtype=torch.long)  # the same draws for every set
            model.zero_grad(set_to_none=True)
            row[name] = float(forward_backward(model, enc, batch, cfg, device, 0, 0, 1.0))
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


def summary(rows: list[dict]) -> dict:
    """Mean loss per set and the paired gap (fresh − seen) with its standard error over batches."""
    gaps = [r["fresh"] - r["seen"] for r in rows]
    se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
    out = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    return {**out, "gap": statistics.mean(gaps), "gap_se": se, "gap_rel": statistics.mean(gaps) / out["seen"]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--seen", required=True, help="shards the model trained on (a glob)")
    ap.add_argument("--fresh", required=True, help="shards of the same generator it never saw (a glob)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON of the rows and the summary")
    a, overrides = ap.parse_known_args(argv)
    from fluxtrain import config as C
    from fluxtrain.data.loader import build_loader
    from fluxtrain.train import Encoders
    from one_process import training_model

    base = ["--data.source", "webdataset", "--data.caption_dropout", "0"]
    cfgs = {name: C.load(a.config, base + overrides + ["--data.path", glob])
            for name, glob in (("seen", a.seen), ("fresh", a.fresh))}
    cfg = cfgs["seen"]
    if not cfg.model.pretrained:
        raise SystemExit("give the trained model: --model.pretrained FOLDER")
    with training_model(cfg, "memorization.py") as (D, model):
        enc = Encoders(cfg, D.device)
        sets = {name: build_loader(c, D.rank, D.world_size) for name, c in cfgs.items()}
        rows = paired_losses(model, enc, sets, cfg, D.device, a.batches)
    s = summary(rows)
    for i, r in enumerate(rows):
        print(f"batch {i}: seen {r['seen']:.4f}  fresh {r['fresh']:.4f}  gap {r['fresh'] - r['seen']:+.4f}")
    print(f"mean: seen {s['seen']:.4f}  fresh {s['fresh']:.4f}  gap {s['gap']:+.4f} ± {s['gap_se']:.4f} (s.e., "
          f"{len(rows)} paired batches of {cfg.train.batch_size}), {s['gap_rel']:+.1%} of the seen loss")
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "summary": s}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
