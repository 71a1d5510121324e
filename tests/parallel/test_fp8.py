"""fp8 recipes map to the torchao configs they name (the conversion runs on CPU; fp8 GEMMs need a GPU).

torchao is the optional fp8 extra. .ci/run installs it into .ci-extra/, outside the venv: once importable, diffusers
imports it on every start, and on a CPU build of torch it prints kernel-load warnings into every CLI's stderr. So the
conversion runs in a subprocess that alone sees it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluxtrain import config as C

EXTRA = Path(__file__).resolve().parents[2] / ".ci-extra"
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None or (EXTRA / "torchao").is_dir()
needs_torchao = pytest.mark.skipif(not HAVE_TORCHAO,
                                   reason="torchao (pip install 'fluxtrain[fp8]', or .ci/run's .ci-extra) is missing")

CONVERT = r"""
import json, sys, torch
from unittest import mock
from fluxtrain.parallel.fp8 import apply_fp8
out = {}
for recipe, ag in [("tensorwise", False), ("tensorwise", True), ("tensorwise_gw_hp", False), ("rowwise", False),
                   ("rowwise_with_gw_hp", False)]:
    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(512, 1024), torch.nn.Linear(64, 64)])
    model.transformer_blocks[0].norm = torch.nn.Linear(512, 512)  # an AdaLN modulation linear: stays bf16
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        n = apply_fp8(model, recipe, ag)
    c = model.transformer_blocks[0].config
    out[f"{recipe},{int(ag)}"] = dict(
        converted=n, all_gather=c.enable_fsdp_float8_all_gather,
        input=c.cast_config_input.scaling_type.value, input_granularity=c.cast_config_input.scaling_granularity.value,
        weight_granularity=c.cast_config_weight.scaling_granularity.value,
        input_gw=c.cast_config_input_for_grad_weight.scaling_type.value,
        grad_output_gw=c.cast_config_grad_output_for_grad_weight.scaling_type.value)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def configs():
    env = dict(os.environ)
    if EXTRA.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXTRA), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", CONVERT], capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, res.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))


@needs_torchao
@pytest.mark.parametrize("ag", [0, 1])
def test_tensorwise_keeps_every_gemm_in_fp8(configs, ag):
    c = configs[f"tensorwise,{ag}"]
    assert c["converted"] == 1  # only the big per-token linear, not the small one or the AdaLN one
    assert c["all_gather"] is bool(ag)
    assert c["input_gw"] == c["grad_output_gw"] == "dynamic"
    assert c["weight_granularity"] == "tensorwise"


@needs_torchao
def test_gw_hp_leaves_the_weight_gradient_gemm_in_high_precision(configs):
    c = configs["tensorwise_gw_hp,0"]
    assert c["input_gw"] == c["grad_output_gw"] == "disabled"
    assert c["input"] == "dynamic"  # the forward GEMM stays fp8


@needs_torchao
@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp"])
def test_rowwise_recipes_scale_per_row(configs, recipe):
    c = configs[f"{recipe},0"]
    assert c["input_granularity"] == "axiswise" and not c["all_gather"]
    assert (c["input_gw"] == "disabled") == recipe.endswith("_gw_hp")


def test_fp8_all_gather_with_a_rowwise_recipe_is_refused():
    with pytest.raises(C.ConfigError, match="fp8_all_gather needs a tensorwise recipe"):
        C.load(None, ["--parallel.fp8", "true", "--parallel.fp8_recipe", "rowwise",
                      "--parallel.fp8_all_gather", "true"])
