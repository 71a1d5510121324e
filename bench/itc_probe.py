"""What ITC can read from its image features at each noise level (issue #6): a linear-probe-style measurement.

    python bench/itc_probe.py --model DIR --out itc_probe.json          # a trained export (diffusers folder)
    python bench/itc_probe.py --preset small --out itc_probe.json       # random weights, the shipped tiny encoders

ITC (fluxtrain/itc.py) pools the image tokens of the last double block on the *empty-prompt* forward of the noisy
latents, at the σ the flow loss drew. If at a σ no caption can be told from those features, ITC's gradient there is
noise into the model: a suspect for the 2–6 points ITC cost in the v7 and v8 ablations. For each σ this script
takes held-out synthetic scenes (half complex, captions true), their features on the empty prompt at x_σ (the same
noise draw at every σ), and trains a fresh ITCHead on frozen features; it reports the head's held-out ITC loss and
image→text top-1 retrieval (a retrieved caption equal to the true one counts), against chance, and the fraction of
the trainer's σ draws (logit-normal with FLUX's resolution shift, at this side) above each σ. Frozen features show
what is readable; they do not show what ITC's gradient does to the model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluxtrain import flow  # noqa: E402
from fluxtrain.itc import capture_block_output, head_for, itc_loss, pooled_image_features  # noqa: E402


def load(a) -> tuple[torch.nn.Module, object, object]:
    """(transformer, text encoders, VAE): an export, or a preset's random weights with tiny encoders."""
    from fluxtrain.models.encoders import Autoencoder, TextEncoders

    if a.model:
        from fluxtrain.sample import load_for_inference

        model, text, vae, _ = load_for_inference(a.model, torch.device(a.device))
        return model.float().eval(), text, vae
    from fluxtrain.models.flux import build_transformer, init_weights
    from fluxtrain.models.presets import transformer_kwargs
    from fluxtrain.models.tiny import tiny_folder

    folder = Path(a.encoders) if a.encoders else tiny_folder()
    model = build_transformer(a.preset, device="cpu")
    init_weights(model, transformer_kwargs(a.preset), seed=a.seed)
    text, vae = TextEncoders(folder, max_tokens=24), Autoencoder(folder)
    return model.to(a.device).eval(), text.to(a.device), vae.to(a.device)


@torch.no_grad()
def scenes(n: int, size: int, seed: int, text, vae, device) -> dict:
    """n synthetic scenes: latents (posterior mean), CLIP pooled (ITC's text side), captions."""
    from fluxtrain.data.loader import to_pixels
    from fluxtrain.data.synthetic import SyntheticShapes

    src = SyntheticShapes(size, complex_frac=0.5, seed=seed)
    items = [src[i] for i in range(n)]
    caps = [it["caption"] for it in items]
    px = to_pixels([it["image"] for it in items])
    lat, pooled = [], []
    for i in range(0, n, 128):
        lat.append(vae.moments(px[i:i + 128].to(device))[0].float())
        pooled.append(text(caps[i:i + 128])[1].float())
    return dict(lat=torch.cat(lat), pooled=torch.cat(pooled), captions=caps)


@torch.no_grad()
def features(model, cap, data: dict, sigma: float, empty: tuple, noise: torch.Tensor) -> torch.Tensor:
    """Pooled last-double-block image features of the empty-prompt forward at x_σ (as ITCObjective takes them)."""
    lat = data["lat"]
    h, w = lat.shape[-2:]
    out = []
    for i in range(0, lat.shape[0], 128):
        x0, eps = flow.pack(lat[i:i + 128]), noise[i:i + 128]
        b = x0.shape[0]
        s = torch.full((b,), sigma, device=x0.device)
        inp = flow.transformer_inputs(flow.noisy_input(x0, eps, s), s, empty[0].expand(b, -1, -1),
                                      empty[1].expand(b, -1), h, w,
                                      1.0 if model.config.guidance_embeds else None)
        cap.enabled = True
        model(**inp)
        cap.enabled = False
        out.append(pooled_image_features(cap.pop()).float())
    return torch.cat(out)


def probe(model, train_f, train_t, test_f, test_t, test_caps, steps: int, seed: int) -> dict:
    """A fresh ITCHead trained on frozen (features, pooled text); held-out loss and top-1 image→text retrieval."""
    torch.manual_seed(seed)
    head = head_for(model, train_t.shape[1]).to(train_f.device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(train_f.shape[0], generator=g)[:256].to(train_f.device)
        loss = itc_loss(head, train_f[idx], train_t[idx], gather=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held = itc_loss(head, test_f, test_t, gather=False).item()
        zi, zt = head(test_f, test_t)
        best = (zi @ zt.t()).argmax(1).tolist()
    top1 = sum(test_caps[j] == test_caps[i] for i, j in enumerate(best)) / len(best)
    chance = sum(test_caps.count(c) for c in test_caps) / len(test_caps) ** 2
    return dict(itc_loss=held, top1=top1, chance_top1=chance, uniform_loss=math.log(len(test_caps)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="an exported diffusers folder (default: --preset, random weights)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--encoders", default=None, help="with --preset: a tiny-FLUX folder (default: the shipped one)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 0.9, 0.75, 0.5, 0.25, 0.0])
    ap.add_argument("--train", type=int, default=1024)
    ap.add_argument("--test", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300, help="head training steps per σ")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="itc_probe.json")
    a = ap.parse_args()
    model, text, vae = load(a)
    dev = torch.device(a.device)
    cap = capture_block_output(model, -1, kind="double")
    cap.enabled = False
    train = scenes(a.train, a.size, 10_000 + a.seed, text, vae, dev)  # seeds apart from the trainer's data seeds
    test = scenes(a.test, a.size, 20_000 + a.seed, text, vae, dev)
    with torch.no_grad():
        e_seq, e_pooled = text([""])
    empty = (e_seq.float(), e_pooled.float())
    g = torch.Generator().manual_seed(a.seed)
    noise = {k: torch.randn(flow.pack(d["lat"]).shape, generator=g).to(dev)
             for k, d in (("train", train), ("test", test))}
    # the trainer's σ draws at this side (train.timestep_sampling = logit_normal, shifted): how often each σ is exceeded
    tokens = (train["lat"].shape[-2] // 2) * (train["lat"].shape[-1] // 2)
    draws = flow.sigmas_from_draws(torch.randn(100_000, generator=g), torch.rand(100_000, generator=g), tokens,
                                   "logit_normal")
    rows = []
    for s in a.sigmas:
        r = probe(model, features(model, cap, train, s, empty, noise["train"]), train["pooled"],
                  features(model, cap, test, s, empty, noise["test"]), test["pooled"], test["captions"], a.steps,
                  a.seed)
        rows.append(dict(sigma=s, frac_draws_above=float((draws > s).float().mean()), **r))
        print(json.dumps(rows[-1]), flush=True)
    Path(a.out).write_text(json.dumps(dict(args=vars(a), image_tokens=tokens, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
