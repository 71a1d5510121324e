"""The training model: meta-device build, parallelize from outside, then materialize only this rank's shards."""

from __future__ import annotations

from pathlib import Path

import torch

from fluxtrain.config import Config
from fluxtrain.models.flux import (build_transformer, iter_pretrained_state, load_state_into, pretrained_kwargs,
                                   random_init_state)
from fluxtrain.models.presets import transformer_kwargs
from fluxtrain.parallel import parallelize


def model_kwargs(cfg: Config) -> dict:
    """The transformer's shape: the pretrained folder's config where there is one, else the preset."""
    if cfg.model.pretrained:
        kw = pretrained_kwargs(cfg.model.pretrained)
        if kw is not None:
            return kw
    return transformer_kwargs(cfg.model.preset)


def encoders_folder(cfg: Config) -> Path:
    """Where the tokenizers, text encoders and VAE come from."""
    from fluxtrain.models.tiny import tiny_folder

    if cfg.model.encoders:
        return Path(cfg.model.encoders)
    if cfg.model.pretrained and Path(cfg.model.pretrained).is_dir():
        return Path(cfg.model.pretrained)
    return tiny_folder()


def build_training_model(cfg: Config, mesh, device: torch.device) -> torch.nn.Module:
    """No rank ever holds the full model: params are created on meta, sharded, then allocated shard by shard."""
    kw = model_kwargs(cfg)
    model = build_transformer(kw, device="meta")
    lc = cfg.lora
    if lc.enabled:  # adapters are injected on meta, before sharding, so FSDP wraps them with their block
        from fluxtrain import lora

        lora.apply_lora(model, lc.rank, lc.alpha, lc.dropout, lc.targets or lora.DEFAULT_TARGETS, lc.init,
                        None if lc.base_dtype == "fp32" else lc.base_dtype)
    parallelize(model, mesh, cfg)
    offload = cfg.parallel.cpu_offload
    model.to_empty(device="cpu" if offload else device)
    if cfg.model.pretrained and cfg.model.load_transformer:
        inner = kw["num_attention_heads"] * kw["attention_head_dim"]
        items = iter_pretrained_state(cfg.model.pretrained, inner)
    else:
        items = random_init_state(kw, cfg.train.seed, device)
    if lc.enabled:
        lora.load_base_into(model, items)
        lora.init_lora_weights(model, seed=cfg.train.seed)
    else:
        load_state_into(model, items)
    return model
