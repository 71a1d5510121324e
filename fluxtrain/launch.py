"""Launcher environment: what `accelerate launch` exports, mapped onto our config keys.

accelerate's FSDP config (deploy/accelerate/fsdp.yaml) reaches the processes only as environment variables;
reading them here makes `accelerate launch -m fluxtrain train …` honour processes, precision, accumulation,
sharding, offload and activation checkpointing. Explicit command-line overrides still win (they come later).
"""

from __future__ import annotations

from typing import Mapping

_STRATEGIES = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD", "5": "HYBRID_SHARD",
               "FULL_SHARD": "FULL_SHARD", "SHARD_GRAD_OP": "SHARD_GRAD_OP", "NO_SHARD": "NO_SHARD",
               "HYBRID_SHARD": "HYBRID_SHARD", "HYBRID_SHARD_ZERO2": "HYBRID_SHARD"}


def _true(v: str | None) -> bool:
    return str(v).lower() in ("1", "true", "yes")


def accelerate_overrides(env: Mapping[str, str]) -> list[str]:
    if "ACCELERATE_MIXED_PRECISION" not in env and env.get("ACCELERATE_USE_FSDP") is None:
        return []
    out: list[str] = []
    mp = env.get("ACCELERATE_MIXED_PRECISION")
    if mp in ("bf16", "no", "fp32"):
        out += ["--parallel.mixed_precision", "bf16" if mp == "bf16" else "fp32"]
    if env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        out += ["--train.grad_accum", env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]]
    if _true(env.get("ACCELERATE_USE_FSDP")):
        strat = env.get("FSDP_SHARDING_STRATEGY")
        # accelerate always exports FSDP_SHARDING_STRATEGY (default FULL_SHARD); for FSDP2 configs the
        # reshard-after-forward flag is what the user chose
        if env.get("FSDP_VERSION") == "2" and env.get("FSDP_RESHARD_AFTER_FORWARD") is not None:
            out += ["--parallel.strategy",
                    "FULL_SHARD" if _true(env["FSDP_RESHARD_AFTER_FORWARD"]) else "SHARD_GRAD_OP"]
        elif strat in _STRATEGIES:
            out += ["--parallel.strategy", _STRATEGIES[strat]]
        if env.get("FSDP_OFFLOAD_PARAMS") is not None:
            out += ["--parallel.cpu_offload", "true" if _true(env["FSDP_OFFLOAD_PARAMS"]) else "false"]
        if env.get("FSDP_ACTIVATION_CHECKPOINTING") is not None:
            out += ["--parallel.activation_checkpointing",
                    "full" if _true(env["FSDP_ACTIVATION_CHECKPOINTING"]) else "none"]
    return out
