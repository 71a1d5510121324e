"""`fluxtrain sample`: images from a diffusers FLUX folder or a training checkpoint, in one process."""

from __future__ import annotations

from pathlib import Path

import torch

from fluxtrain import config as C


def load_for_inference(model_path: str | Path, device: torch.device):
    """(transformer, text encoders, vae, run config or None) from a diffusers folder or a checkpoint (a folder or an
    fsspec URL such as s3://…)."""
    from fluxtrain.checkpoint import is_url
    from fluxtrain.models.encoders import Autoencoder, TextEncoders
    from fluxtrain.models.flux import build_transformer, iter_pretrained_state, load_state_into, pretrained_kwargs

    p = Path(model_path)  # only looked at for local paths: Path folds a URL's `s3://` into `s3:/`
    cfg = None
    if not is_url(model_path) and ((p / "model_index.json").is_file() or p.suffix == ".safetensors"):
        kw = pretrained_kwargs(p) if p.is_dir() else None
        if kw is None:
            raise C.ConfigError(f"{p}: a BFL single file needs a config; sample from a diffusers folder instead")
        folder = p
        model = build_transformer(kw, device="cpu")
        load_state_into(model, iter_pretrained_state(p, kw["num_attention_heads"] * kw["attention_head_dim"]))
    else:
        from fluxtrain.export import load_checkpoint_model

        model, cfg, folder = load_checkpoint_model(model_path)
    dev_dtype = torch.float32
    text = TextEncoders(folder, max_tokens=cfg.model.max_text_tokens if cfg else 512, dtype=dev_dtype).to(device)
    vae = Autoencoder(folder, dtype=dev_dtype).to(device)
    return model.to(device).eval(), text, vae, cfg


def sample_to_dir(model_path, prompts: list[str], out: str | Path, resolution: int | None = None, steps: int = 20,
                  guidance: float | None = None, seed: int = 0) -> list[Path]:
    from fluxtrain.eval.grid import generate, save_grid

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, text, vae, cfg = load_for_inference(model_path, device)
    res = resolution or (cfg.data.resolution if cfg else 64)
    g = guidance if guidance is not None else (cfg.model.guidance if cfg else 3.5)
    images = generate(model, text, vae, prompts, res, steps=steps,
                      guidance=g if model.config.guidance_embeds else None, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(out / f"{i:03d}.png")
        im.save(paths[-1])
    save_grid(images, prompts, out / "grid.png")
    return paths
