"""Parallelism applied from outside the model: `parallelize(model, mesh, cfg)` calls one function per concern."""

from __future__ import annotations

import torch

from fluxtrain.config import Config
from fluxtrain.parallel.activation_checkpoint import apply_ac
from fluxtrain.parallel.compile import apply_compile
from fluxtrain.parallel.fsdp import apply_fsdp


def parallelize(model: torch.nn.Module, mesh, cfg: Config) -> torch.nn.Module:
    """AC, then compile, then FSDP (torchtitan's order: FSDP wraps the compiled, checkpointed blocks)."""
    apply_ac(model, cfg.parallel)
    if cfg.train.compile:
        apply_compile(model)
    apply_fsdp(model, mesh, cfg.parallel)
    return model
