"""For bench scripts that measure a model outside the trainer: the model built as the trainer builds it."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def training_model(cfg, script: str):
    """(mesh info, the model of `cfg` in training mode) in one process (no torchrun); the group is torn down after."""
    from fluxtrain.models.setup import build_training_model
    from fluxtrain.parallel import mesh as pmesh

    D = pmesh.init(cfg)
    try:
        if D.world_size != 1:
            raise SystemExit(f"{script} runs in one process (no torchrun)")
        torch.manual_seed(cfg.train.seed)
        model = build_training_model(cfg, D.mesh, D.device)
        model.train()
        yield D, model
    finally:
        pmesh.teardown(D.owns_group)
