"""Exponential moving average of the trainable parameters, sharded exactly like them.

Each EMA tensor is `p.detach().clone()` of the parameter: for an FSDP2 DTensor parameter that is a DTensor with the
same mesh and placements holding only this rank's shard, so no rank ever holds a full copy and DCP saves/reshards
the EMA like the model (`state_dict()` is a dict of DTensors keyed by the parameter's clean FQN).

    ema = EMA(model, decay=0.999, every=1, warmup=False)    # after the weights are loaded/initialised
    ...                                                     # after each successful optimizer step:
    ema.update(model, step)
    state["ema"] = ema.state_dict()                         # DCP save / load (load is in place)
    with ema.swap_into(model):                              # sampling / export with the EMA weights
        ...
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from fluxtrain.lora import clean_name
from fluxtrain.lora import reshard as _reshard


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """EMA over `model`'s trainable parameters (requires_grad: full fine-tuning or LoRA adapters).

    `update(model, step)` acts when `step % every == 0`: ema ← d·ema + (1 − d)·p with d = decay, or with
    `warmup` d = min(decay, (1 + step) / (10 + step)). Elementwise on the local shards, so the result is the same
    as a single-process EMA of the full tensors."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, every: int = 1, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema.decay = {decay}: must be in [0, 1]")
        if every < 1:
            raise ValueError(f"ema.every = {every}: must be ≥ 1")
        self.decay, self.every, self.warmup = float(decay), int(every), bool(warmup)
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in self._params(model):
                self.shadow[name] = p.detach().clone()
        if not self.shadow:
            raise ValueError("EMA: the model has no trainable parameters")

    @staticmethod
    def _params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        _reshard(model)  # the sharded DTensors, never FSDP's transient unsharded tensors
        for name, p in model.named_parameters():
            if p.requires_grad:
                yield clean_name(name), p

    def _pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        own = dict(self._params(model))
        if own.keys() != self.shadow.keys():
            extra = sorted(set(own) ^ set(self.shadow))
            raise KeyError(f"EMA and model trainable parameters differ, e.g. '{extra[0]}'")
        names = list(self.shadow)
        return [_local(self.shadow[n]) for n in names], [_local(own[n].detach()) for n in names]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> bool:
        """Fold the current parameters in (if `step` is an update step). Returns whether it did."""
        if step % self.every:
            return False
        d = self.decay_at(step)
        ema, cur = self._pairs(model)
        # ema + (1 - d)·(p - ema), elementwise on this rank's shards
        torch._foreach_lerp_(ema, [c.to(e.dtype) for c, e in zip(cur, ema)], 1.0 - d)
        return True

    # ---- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA tensors themselves (DTensors under FSDP), keyed by clean parameter FQN: give it to DCP as one
        entry of the app state; `dcp.load` fills it in place (resharding to this world size)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks '{missing[0]}' (and {len(missing) - 1} more)")
        for k, dst in self.shadow.items():
            src = state[k]
            if src is dst:
                continue
            if hasattr(dst, "to_local") and not hasattr(src, "to_local"):
                from fluxtrain.lora import _copy_full_into

                _copy_full_into(dst, src)  # a full tensor: keep this rank's slice
            else:
                _local(dst).copy_(_local(src))

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite the trainable parameters with the EMA (no restore: see swap_into)."""
        ema, cur = self._pairs(model)
        torch._foreach_copy_(cur, ema)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered EMA tensors on CPU (a collective under FSDP: every rank calls; for tests and small models)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                for k, v in self.shadow.items()}

    @contextmanager
    def swap_into(self, model: torch.nn.Module):
        """Use the EMA weights inside the block (sampling, export), then restore the training weights bit for
        bit. Costs one extra copy of the local trainable shards while inside."""
        ema, cur = self._pairs(model)
        with torch.no_grad():
            backup = [c.clone() for c in cur]
            torch._foreach_copy_(cur, ema)
        try:
            yield model
        finally:
            with torch.no_grad():
                _reshard(model)
                torch._foreach_copy_(cur, backup)
            del backup
