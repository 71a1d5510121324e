"""FSDP2 (`fully_shard`) per transformer block, then the root: the guide's strategies the FSDP2 way."""

from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from fluxtrain.config import ParallelConfig


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP wraps: every double-stream then every single-stream block (the guide's auto-wrap policy)."""
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def mp_policy(p: ParallelConfig) -> MixedPrecisionPolicy:
    if p.mixed_precision == "bf16":
        # bf16 compute and all-gather, fp32 gradient reduction and fp32 master weights (the guide's setting)
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True)
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def apply_fsdp(model: torch.nn.Module, mesh: DeviceMesh, p: ParallelConfig) -> None:
    """Shard in place. FULL_SHARD reshards after forward; SHARD_GRAD_OP keeps parameters gathered until backward;
    NO_SHARD replicates (DDP semantics: the 'shard' dimension has size 1); HYBRID_SHARD shards within the mesh's
    second dimension and replicates across the first."""
    # FSDP2 warns once per module class that returns a view (an in-place op on it would skip the pre-backward
    # hook). diffusers' single blocks return two slices of one tensor and the model a reshaped output; nothing changes
    # them in place (the next block concatenates them, the loss is out of place), and tests/parallel/test_fsdp.py
    # compares sharded with unsharded losses. The warning only alarmed the demo's users.
    flux = r"(FSDPFlux\w+|FSDPCheckpointWrapper)"  # the blocks, bare or in AC's wrapper, and the model
    warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \({flux}\) returned a view tensor",
                            category=UserWarning)
    if p.strategy == "NO_SHARD":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(mesh.device_type, (mesh.size(), 1), mesh_dim_names=("replicate", "shard"))
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if p.cpu_offload else OffloadPolicy()
    common = dict(mesh=mesh, mp_policy=mp_policy(p), offload_policy=offload)
    reshard = p.strategy in ("FULL_SHARD", "HYBRID_SHARD")
    units = blocks(model)
    for i, block in enumerate(units):
        # The last block's parameters are needed again at once by backward: keeping them avoids one all-gather.
        last = i == len(units) - 1
        fully_shard(block, reshard_after_forward=reshard and not (last and not p.reshard_last_block), **common)
    fully_shard(model, reshard_after_forward=False, **common)
    _set_prefetch(units, p)


def _set_prefetch(units: list[torch.nn.Module], p: ParallelConfig) -> None:
    """Explicit prefetch of the next k blocks' all-gathers (FSDP2 prefetches one by default in backward)."""
    if p.forward_prefetch > 1:
        for i, block in enumerate(units):
            nxt = units[i + 1 : i + 1 + p.forward_prefetch]
            if nxt:
                block.set_modules_to_forward_prefetch(nxt)
    if p.backward_prefetch > 1:
        for i, block in enumerate(units):
            prev = units[max(0, i - p.backward_prefetch) : i][::-1]
            if prev:
                block.set_modules_to_backward_prefetch(prev)
