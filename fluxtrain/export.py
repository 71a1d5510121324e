"""`fluxtrain export`: full-state export of a DCP checkpoint to diffusers or BFL safetensors, offline."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from fluxtrain import config as C


def run_config_of(ckpt: Path) -> C.Config:
    cfg_file = ckpt.parent.parent / "config.toml"
    if not cfg_file.is_file():
        raise C.ConfigError(f"{ckpt}: no config.toml two levels up; is this a run's checkpoints/step-N folder?")
    return C.load(cfg_file)


def load_checkpoint_model(ckpt: str | Path):
    """An unsharded fp32 transformer with the checkpoint's weights, read without a process group
    (DCP reassembles the shards). Returns (model, run config, folder of encoders/VAE)."""
    import torch.distributed.checkpoint as dcp

    from fluxtrain.models.flux import build_transformer
    from fluxtrain.models.setup import encoders_folder, model_kwargs

    ckpt = Path(ckpt)
    cfg = run_config_of(ckpt)
    kw = model_kwargs(cfg)
    model = build_transformer(kw, device="cpu")
    if cfg.lora.enabled:  # the checkpoint holds adapters only: merge them into the base it references
        from fluxtrain import lora
        from fluxtrain.models.flux import iter_pretrained_state, random_init_state

        base = (dict(iter_pretrained_state(cfg.model.pretrained, kw["num_attention_heads"] * kw["attention_head_dim"]))
                if cfg.model.pretrained and cfg.model.load_transformer else dict(random_init_state(kw, cfg.train.seed)))
        section = "ema" if cfg.ema.enabled and cfg.ema.use_for_export else "model"
        adapters = lora.lora_state_from_checkpoint(ckpt, section)
        model.load_state_dict(lora.merge_lora_state(base, adapters, cfg.lora.alpha, cfg.lora.rank))
    else:
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(ckpt))
        model.load_state_dict(state["model"])
    try:
        folder = encoders_folder(cfg)
    except FileNotFoundError:  # no encoders/VAE to pair with: the export holds the transformer alone
        folder = None
    return model, cfg, folder


def export_lora(ckpt: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    """A LoRA run's adapters in the folder format FluxPipeline.load_lora_weights reads."""
    from fluxtrain import lora

    cfg = run_config_of(Path(ckpt))
    if not cfg.lora.enabled:
        raise C.ConfigError(f"{ckpt} is not a LoRA run (lora.enabled = false): export --format diffusers or bfl")
    section = "ema" if cfg.ema.enabled and cfg.ema.use_for_export else "model"
    meta = lora.lora_metadata(cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets or lora.DEFAULT_TARGETS)
    return lora.write_lora(lora.lora_state_from_checkpoint(ckpt, section), out, meta,
                           dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)


def export(ckpt: str | Path, fmt: str, out: str | Path, dtype: str = "bf16") -> Path:
    from fluxtrain.models import bfl
    from fluxtrain.models.flux import save_diffusers

    model, cfg, folder = load_checkpoint_model(ckpt)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    state = {k: v.to(dt) for k, v in model.state_dict().items()}
    out = Path(out)
    if fmt == "diffusers":
        # a complete FluxPipeline folder: our transformer beside the encoders/VAE it was trained with
        for part in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
            if folder and (folder / part).exists() and not (out / part).exists():
                shutil.copytree(folder / part, out / part)
        if folder and (folder / "model_index.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / "model_index.json", out / "model_index.json")
        save_diffusers(state, dict(model.config), out / "transformer")
        return out
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    target = out if out.suffix == ".safetensors" else out / "flux1-transformer.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bfl.diffusers_to_bfl(state).items()}, str(target))
    return target


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fluxtrain export")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--format", choices=["diffusers", "bfl", "lora"], default="diffusers",
                    help="diffusers folder, BFL single file, or (LoRA runs) the adapters alone; LoRA runs export "
                         "merged weights for diffusers/bfl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    a = ap.parse_args(argv)
    out = export_lora(a.checkpoint, a.out, a.dtype) if a.format == "lora" else export(a.checkpoint, a.format, a.out, a.dtype)
    print(f"exported to {out}")
    return 0
