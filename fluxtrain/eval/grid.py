"""Sampling for the in-training grids and `fluxtrain sample`: prompts → images, and a labelled PNG grid."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from fluxtrain import flow


@torch.no_grad()
def generate(transformer, text, vae, prompts: list[str], resolution: int, steps: int = 20,
             guidance: float | None = 3.5, seed: int = 0, true_cfg: float = 1.0,
             cfg_interval: tuple[float, float] | None = None) -> list[Image.Image]:
    """One image per prompt, all prompts in one batch; prompt i starts from the noise of seed + i, so a grid is
    reproducible prompt by prompt. true_cfg > 1: classifier-free guidance against the empty prompt (only for σ in
    cfg_interval, when given: flow.sample)."""
    seq, pooled = text(prompts)
    lat = resolution // vae.downsample
    channels = transformer.config.in_channels // 4
    noise = torch.cat([torch.randn(1, channels, lat, lat, generator=torch.Generator().manual_seed(seed + i))
                       for i in range(len(prompts))])
    neg = text([""]) if true_cfg != 1.0 else None
    latents = flow.sample(transformer, seq, pooled, lat, lat, steps=steps, guidance=guidance, noise=noise, neg=neg,
                          cfg_scale=true_cfg, cfg_interval=cfg_interval)
    images = vae.decode(latents.to(seq.device))
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def save_grid(images: list[Image.Image], captions: list[str] | None, out: str | Path, cols: int | None = None,
              scale: int = 2) -> Path:
    """A grid of images, each scaled up and captioned underneath."""
    n = len(images)
    cols = cols or min(n, 4)
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    w, h = w * scale, h * scale
    cap_h = 14 if captions else 0
    grid = Image.new("RGB", (cols * w, rows * (h + cap_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + cap_h)
        grid.paste(im.resize((w, h), Image.NEAREST), (x, y))
        if captions:
            draw.text((x + 2, y + h + 1), captions[i][: w // 6], fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out

