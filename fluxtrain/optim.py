"""AdamW (fused on GPU, foreach on CPU) over the trainable parameters, and the LR schedule."""

from __future__ import annotations

import math

import torch

from fluxtrain.config import OptimConfig


def build_optimizer(params, o: OptimConfig, device: torch.device, offloaded: bool = False) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    # With CPU offload the optimizer steps on CPU, where fused AdamW is also available in recent torch.
    fused = o.fused and (device.type == "cuda" and not offloaded)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, total: int, o: OptimConfig) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if o.schedule == "cosine" else 1 - frac
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, o: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, o))
