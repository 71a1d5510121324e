"""fp8 recipes map to the torchao configs they name (the conversion itself runs on CPU; fp8 GEMMs need a GPU)."""

from unittest import mock

import pytest
import torch

from fluxtrain import config as C
from fluxtrain.parallel.fp8 import apply_fp8

try:
    from torchao.float8 import ScalingGranularity, ScalingType
except ImportError:  # the fp8 extra: .ci/run installs it
    ScalingGranularity = ScalingType = None

needs_torchao = pytest.mark.skipif(ScalingType is None,
                                   reason="torchao (pip install 'fluxtrain[fp8]') is not installed")


def convert(recipe: str, all_gather: bool = False) -> torch.nn.Module:
    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(512, 1024), torch.nn.Linear(64, 64)])
    model.transformer_blocks[0].norm = torch.nn.Linear(512, 512)  # an AdaLN modulation linear: stays bf16
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        assert apply_fp8(model, recipe, all_gather) == 1  # only the big per-token linear
    return model.transformer_blocks[0]


@needs_torchao
@pytest.mark.parametrize("all_gather", [False, True])
def test_tensorwise_keeps_every_gemm_in_fp8(all_gather):
    c = convert("tensorwise", all_gather).config
    assert c.enable_fsdp_float8_all_gather is all_gather
    assert c.cast_config_input_for_grad_weight.scaling_type is ScalingType.DYNAMIC
    assert c.cast_config_grad_output_for_grad_weight.scaling_type is ScalingType.DYNAMIC
    assert c.cast_config_weight.scaling_granularity is ScalingGranularity.TENSORWISE


@needs_torchao
def test_gw_hp_leaves_the_weight_gradient_gemm_in_high_precision():
    c = convert("tensorwise_gw_hp").config
    assert c.cast_config_input_for_grad_weight.scaling_type is ScalingType.DISABLED
    assert c.cast_config_grad_output_for_grad_weight.scaling_type is ScalingType.DISABLED
    assert c.cast_config_input.scaling_type is ScalingType.DYNAMIC  # the forward GEMM stays fp8


@needs_torchao
@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp"])
def test_rowwise_recipes_scale_per_row(recipe):
    c = convert(recipe).config
    assert c.cast_config_input.scaling_granularity is ScalingGranularity.AXISWISE
    assert not c.enable_fsdp_float8_all_gather
    assert (c.cast_config_input_for_grad_weight.scaling_type is ScalingType.DISABLED) == recipe.endswith("_gw_hp")


def test_fp8_all_gather_with_a_rowwise_recipe_is_refused():
    with pytest.raises(C.ConfigError, match="fp8_all_gather needs a tensorwise recipe"):
        C.load(None, ["--parallel.fp8", "true", "--parallel.fp8_recipe", "rowwise",
                      "--parallel.fp8_all_gather", "true"])
