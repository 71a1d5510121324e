"""fp8 training of the transformer blocks' linears with torchao (Float8Linear, fp8 all-gather under FSDP2)."""

from __future__ import annotations

import torch

from fluxtrain.config import ConfigError


def _eligible(mod: torch.nn.Module, fqn: str) -> bool:
    # Only the big per-token block linears: fp8 GEMMs need dims divisible by 16, small ones don't pay for the
    # casts, and the AdaLN modulation linears ("norm…") see one row per sample (their weight-grad GEMM fails in fp8).
    return (isinstance(mod, torch.nn.Linear) and "transformer_blocks" in fqn and ".norm" not in fqn
            and mod.in_features % 16 == 0 and mod.out_features % 16 == 0 and mod.in_features >= 512)


def apply_fp8(model: torch.nn.Module, recipe: str = "tensorwise") -> int:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError("parallel.fp8 needs torchao: pip install 'fluxtrain[fp8]'") from None
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError("parallel.fp8 needs an fp8 GPU (Hopper/Ada or newer): set parallel.fp8 = false")
    cfg = (Float8LinearConfig(enable_fsdp_float8_all_gather=True) if recipe == "tensorwise"
           else Float8LinearConfig.from_recipe_name(recipe))
    convert_to_float8_training(model, config=cfg, module_filter_fn=_eligible)
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")


def after_optimizer_step(model: torch.nn.Module) -> None:
    """One all-reduce for every fp8 weight's scale instead of one per all-gather."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
