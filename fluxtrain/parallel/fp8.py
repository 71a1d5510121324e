"""fp8 training of the transformer blocks' linears with torchao (Float8Linear, fp8 all-gather under FSDP2)."""

from __future__ import annotations

import functools

import torch

from fluxtrain.config import ConfigError


def _eligible(mod: torch.nn.Module, fqn: str) -> bool:
    # Only the big per-token block linears: fp8 GEMMs need dims divisible by 16, small ones don't pay for the
    # casts, and the AdaLN modulation linears ("norm…") see one row per sample (their weight-grad GEMM fails in fp8).
    return (isinstance(mod, torch.nn.Linear) and "transformer_blocks" in fqn and ".norm" not in fqn
            and mod.in_features % 16 == 0 and mod.out_features % 16 == 0 and mod.in_features >= 512)


@functools.cache
def saved_input_linear():
    """torchao's Float8Linear with the input cast to fp8 before its autograd function, so the function keeps the fp8
    input (1 byte an element, not bf16's 2) and the weight gradient's GEMM reuses it: tensorwise scaling makes that
    cast the same one the backward would make again (the ninth session's profile: torchao recasts the input in the
    backward, one amax and one cast pass). With op-level AC, `activation_checkpoint` saves the casts instead of
    recomputing them."""
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    class Float8LinearSavedInput(Float8Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled():  # as Float8Linear.forward
                input = input.to(torch.get_autocast_gpu_dtype())
            c = self.config.cast_config_input
            x8 = hp_tensor_to_float8_dynamic(input, c.target_dtype, self.linear_mm_config,
                                             gemm_input_role=GemmInputRole.INPUT,
                                             scaling_granularity=c.scaling_granularity,
                                             axiswise_dim=get_maybe_axiswise_dim(-1, c.scaling_granularity),
                                             round_scales_to_power_of_2=self.config.round_scales_to_power_of_2)
            out = matmul_with_hp_or_float8_args.apply(x8, self.weight.t(), self.linear_mm_config, self.config)
            return out if self.bias is None else out + self.bias.to(out.dtype)

    return Float8LinearSavedInput


def apply_fp8(model: torch.nn.Module, recipe: str = "tensorwise", all_gather: bool = False) -> int:
    try:
        from torchao.float8 import CastConfig, Float8LinearConfig, ScalingType, convert_to_float8_training
    except ImportError:
        raise ConfigError("parallel.fp8 needs torchao: pip install 'fluxtrain[fp8]'") from None
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError("parallel.fp8 needs an fp8 GPU (Hopper/Ada or newer): set parallel.fp8 = false")
    if recipe == "tensorwise_saved":
        cfg = Float8LinearConfig(enable_fsdp_float8_all_gather=all_gather)
    elif recipe.startswith("tensorwise"):
        # _gw_hp: grad_weight = input^T @ grad_output in bf16, the GEMM whose fp8 operand layout torch 2.11's inductor
        # rejected (`_scaled_mm: self must be row_major`)
        hp = recipe.endswith("_gw_hp")
        off = lambda: CastConfig(scaling_type=ScalingType.DISABLED) if hp else None  # noqa: E731  (one per operand)
        cfg = Float8LinearConfig(enable_fsdp_float8_all_gather=all_gather, cast_config_input_for_grad_weight=off(),
                                 cast_config_grad_output_for_grad_weight=off())
    else:
        cfg = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(model, config=cfg, module_filter_fn=_eligible)
    from torchao.float8.float8_linear import Float8Linear

    converted = [m for m in model.modules() if isinstance(m, Float8Linear)]
    if recipe == "tensorwise_saved":
        for m in converted:  # the same parameters and configs, another forward
            m.__class__ = saved_input_linear()
    return len(converted)


def after_optimizer_step(model: torch.nn.Module) -> None:
    """One all-reduce for every fp8 weight's scale instead of one per all-gather."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
