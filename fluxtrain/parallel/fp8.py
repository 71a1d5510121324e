"""fp8 training of the transformer blocks' linears with torchao (Float8Linear, fp8 all-gather under FSDP2)."""

from __future__ import annotations

import torch

from fluxtrain.config import ConfigError


def _eligible(mod: torch.nn.Module, fqn: str) -> bool:
    # Only the big per-token block linears: fp8 GEMMs need dims divisible by 16, small ones don't pay for the
    # casts, and the AdaLN modulation linears ("norm…") see one row per sample (their weight-grad GEMM fails in fp8).
    return (isinstance(mod, torch.nn.Linear) and "transformer_blocks" in fqn and ".norm" not in fqn
            and mod.in_features % 16 == 0 and mod.out_features % 16 == 0 and mod.in_features >= 512)


def apply_fp8(model: torch.nn.Module, recipe: str = "tensorwise", all_gather: bool = False) -> int:
    try:
        from torchao.float8 import CastConfig, Float8LinearConfig, ScalingType, convert_to_float8_training
    except ImportError:
        raise ConfigError("parallel.fp8 needs torchao: pip install 'fluxtrain[fp8]'") from None
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError("parallel.fp8 needs an fp8 GPU (Hopper/Ada or newer): set parallel.fp8 = false")
    if recipe.startswith("tensorwise"):
        # _gw_hp: grad_weight = input^T @ grad_output in bf16, the GEMM whose fp8 operand layout torch 2.11's inductor
        # rejected (`_scaled_mm: self must be row_major`)
        hp = recipe.endswith("_gw_hp")
        off = lambda: CastConfig(scaling_type=ScalingType.DISABLED) if hp else None  # noqa: E731  (one per operand)
        cfg = Float8LinearConfig(enable_fsdp_float8_all_gather=all_gather, cast_config_input_for_grad_weight=off(),
                                 cast_config_grad_output_for_grad_weight=off())
    else:
        cfg = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(model, config=cfg, module_filter_fn=_eligible)
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")


def after_optimizer_step(model: torch.nn.Module) -> None:
    """One all-reduce for every fp8 weight's scale instead of one per all-gather."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
