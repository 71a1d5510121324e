"""Activation checkpointing applied from outside the model: full, every k-th block, or op-level selective."""

from __future__ import annotations

import functools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from fluxtrain.config import ParallelConfig
from fluxtrain.parallel import cudnn_attention  # noqa: F401  (registers torch.ops.fluxtrain.cudnn_attention)

# Op-level selective AC saves the outputs of these (expensive to recompute) and recomputes the cheap rest:
# normalisations, activations, rotary embedding, elementwise modulation.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.fluxtrain.cudnn_attention.default,
    torch.ops.aten._scaled_mm.default,  # fp8 linears (parallel.fp8): their GEMM is saved like a bf16 one
}


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _policy_fp8_casts(ctx, op, *args, **kwargs):
    """Also saves the activations' fp8 casts and the amax reductions their scales come from (parallel.fp8_recipe =
    tensorwise_saved): the backward then reads the fp8 input its weight-gradient GEMM needs instead of recomputing it
    from bf16. Activations are [B, L, D]; the weights' casts (2-D) are made again, since a saved copy of an
    all-gathered weight would outlive FSDP's reshard (1 byte per parameter of the whole model)."""
    if op is torch.ops.aten.max.default or (op is torch.ops.aten._to_copy.default and kwargs.get("dtype") in _FP8
                                            and args[0].dim() >= 3):
        return CheckpointPolicy.MUST_SAVE
    return _policy(ctx, op, *args, **kwargs)


def _wrap(block: torch.nn.Module, ops: bool, policy=_policy) -> torch.nn.Module:
    if ops:
        ctx = functools.partial(create_selective_checkpoint_contexts, policy)
        return checkpoint_wrapper(block, context_fn=ctx, preserve_rng_state=False)
    return checkpoint_wrapper(block, preserve_rng_state=False)


def apply_ac(model: torch.nn.Module, p: ParallelConfig) -> int:
    """Wrap blocks in place (before FSDP, like torchtitan). Returns how many blocks are checkpointed."""
    if p.activation_checkpointing == "none":
        return 0
    every = 1 if p.activation_checkpointing == "full" else p.ac_every
    ops = p.activation_checkpointing == "selective" and p.ac_ops
    policy = _policy_fp8_casts if p.fp8 and p.fp8_recipe == "tensorwise_saved" else _policy
    n = 0
    for name in ("transformer_blocks", "single_transformer_blocks"):
        mods = getattr(model, name)
        for i in range(len(mods)):
            if ops or i % every == 0:
                mods[i] = _wrap(mods[i], ops, policy)
                n += 1
    return n
