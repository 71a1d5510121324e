"""Parallelism applied from outside the model: `parallelize(model, mesh, cfg)` calls one function per concern."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from fluxtrain.config import Config
from fluxtrain.parallel.activation_checkpoint import apply_ac
from fluxtrain.parallel.attention import apply_attention_backend
from fluxtrain.parallel.compile import apply_compile
from fluxtrain.parallel.fsdp import apply_fsdp


def wants_fsdp(mesh, cfg: Config) -> bool:
    """One process in fp32 without offload has nothing to shard, cast or offload: FSDP2 would only add its hooks,
    gradient copies and DTensor dispatch, which were ~40% of a tiny model's step on CPU (bench in RESULTS.md)."""
    p = cfg.parallel
    return mesh.size() > 1 or p.mixed_precision != "fp32" or p.cpu_offload


def parallelize(model: torch.nn.Module, mesh, cfg: Config) -> torch.nn.Module:
    """Attention kernel, fp8, then AC, then compile, then FSDP (torchtitan's order: FSDP wraps the compiled,
    checkpointed blocks)."""
    apply_attention_backend(model, cfg.model.attention_backend, mesh.device_type, cfg.parallel.mixed_precision)
    if cfg.parallel.fp8:
        from fluxtrain.parallel.fp8 import apply_fp8

        apply_fp8(model, cfg.parallel.fp8_recipe, cfg.parallel.fp8_all_gather)
    apply_ac(model, cfg.parallel)
    if cfg.train.compile:
        if cfg.train.compile_mode == "reduce-overhead" and wants_fsdp(mesh, cfg):
            raise ValueError(f"train.compile_mode = reduce-overhead needs one process without FSDP (world size is "
                             f"{mesh.size()}): use train.compile_mode = default")
        apply_compile(model, cfg.train.compile_mode)
    if wants_fsdp(mesh, cfg):
        apply_fsdp(model, mesh, cfg.parallel)
    return model


def cpu_threads(p, local_world_size: int, cores: int) -> int | None:
    """Intra-op threads for this rank (None: leave torch's setting)."""
    if p.cpu_threads > 0:
        return p.cpu_threads
    if p.cpu_offload:
        return max(1, cores // max(1, local_world_size))
    return None


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota where one is set (a container
    can see every host core in its affinity and still be limited to a few: threads past the quota only contend)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "800000 100000"
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cores
    if quota in ("max", "-1") or int(period) <= 0:
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def set_cpu_threads(cfg: Config) -> int:
    """Apply parallel.cpu_threads; returns the thread count in effect (for the log)."""
    n = cpu_threads(cfg.parallel, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), usable_cores())
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def set_matmul_precision(device: torch.device, tf32: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on a GPU (the flags are process-wide; the CPU has no TF32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def after_optimizer_step(model: torch.nn.Module, cfg: Config) -> None:
    if cfg.parallel.fp8 and cfg.parallel.fp8_all_gather:  # (config.validate allows it with tensorwise recipes only)
        from fluxtrain.parallel.fp8 import after_optimizer_step as fp8_step

        fp8_step(model)
