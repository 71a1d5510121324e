"""Per-block torch.compile with static shapes (a block recompiled for a new shape hit an inductor assert)."""

from __future__ import annotations

import torch

from fluxtrain.parallel.fsdp import blocks


def apply_compile(model: torch.nn.Module, mode: str = "default") -> None:
    # Module.compile() compiles in place, so parameter names (checkpoints, exports) don't change.
    for block in blocks(model):
        block.compile(dynamic=False, fullgraph=False, mode=None if mode == "default" else mode)
