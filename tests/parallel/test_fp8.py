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

# Every script below starts with this: apply_fp8 as on an fp8 GPU (the conversion itself runs on the CPU).
PRELUDE = r"""
from unittest import mock
from fluxtrain.parallel.fp8 import apply_fp8


def convert(model, recipe, all_gather=False):
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        return apply_fp8(model, recipe, all_gather)
"""

CONVERT = r"""
import json, sys, torch
out = {}
for recipe, ag in [("tensorwise", False), ("tensorwise", True), ("tensorwise_gw_hp", False), ("rowwise", False),
                   ("rowwise_with_gw_hp", False)]:
    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(512, 1024), torch.nn.Linear(64, 64)])
    model.transformer_blocks[0].norm = torch.nn.Linear(512, 512)  # an AdaLN modulation linear: stays bf16
    n = convert(model, recipe, ag)
    c = model.transformer_blocks[0].config
    out[f"{recipe},{int(ag)}"] = dict(
        converted=n, all_gather=c.enable_fsdp_float8_all_gather,
        input=c.cast_config_input.scaling_type.value, input_granularity=c.cast_config_input.scaling_granularity.value,
        weight_granularity=c.cast_config_weight.scaling_granularity.value,
        input_gw=c.cast_config_input_for_grad_weight.scaling_type.value,
        grad_output_gw=c.cast_config_grad_output_for_grad_weight.scaling_type.value)
print("RESULT " + json.dumps(out))
"""


def run_with_torchao(script: str, *args: str) -> dict:
    env = dict(os.environ)
    if EXTRA.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXTRA), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", PRELUDE + script, *args], capture_output=True, text=True, env=env,
                         timeout=300)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, res.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def configs():
    return run_with_torchao(CONVERT)


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



# tensorwise_saved on CPU (torch's CPU _scaled_mm runs real fp8 GEMMs): one linear between cheap ops, each recipe with
# and without op-level AC; counts the fp8 casts of the linear's input (and of its weight) made during the backward.
SAVED = r"""
import json, torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from fluxtrain.config import ParallelConfig
from fluxtrain.parallel.activation_checkpoint import apply_ac

FP8, aten = (torch.float8_e4m3fn, torch.float8_e5m2), torch.ops.aten


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_in, self.fc = nn.LayerNorm(512), nn.Linear(512, 1024)

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(self.norm_in(x)))


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.input, self.weight = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and kwargs.get("dtype") in FP8:
            self.input += args[0].numel() == 4 * 64 * 512  # the input; the output gradient is 1024 wide
            self.weight += args[0].numel() == 512 * 1024
        return func(*args, **kwargs)


def run(recipe, ac):
    torch.manual_seed(0)
    model = nn.Module()
    model.transformer_blocks, model.single_transformer_blocks = nn.ModuleList([Block()]), nn.ModuleList()
    n = convert(model, recipe)
    apply_ac(model, ParallelConfig(activation_checkpointing="selective" if ac else "none", ac_ops=True, fp8=True,
                                   fp8_recipe=recipe))
    model = model.to(torch.bfloat16)
    x = torch.randn(4, 64, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_()
    y = model.transformer_blocks[0](x)
    with Count() as bwd:
        y.float().pow(2).mean().backward()
    return n, bwd, [x.grad] + [p.grad for p in model.parameters()]


out, ref = {}, None
for recipe in ("tensorwise", "tensorwise_saved"):
    for ac in (0, 1):
        n, bwd, grads = run(recipe, ac)
        ref = ref or grads
        out[f"{recipe},{ac}"] = dict(converted=n, input_casts=bwd.input, weight_casts=bwd.weight,
                                     same_grads=all(torch.equal(a, b) for a, b in zip(grads, ref)))
print("RESULT " + json.dumps(out))
"""


@needs_torchao
def test_tensorwise_saved_reuses_the_forward_input_cast_with_the_same_gradients():
    r = run_with_torchao(SAVED)
    assert all(v["converted"] == 1 and v["same_grads"] for v in r.values()), r  # bit-identical to tensorwise
    # torchao recasts the input for the weight gradient (and op-level AC recomputes the forward's cast too)
    assert (r["tensorwise,0"]["input_casts"], r["tensorwise,1"]["input_casts"]) == (1, 2)
    # the saved recipe reads the forward's fp8 input, with and without op-level AC
    assert (r["tensorwise_saved,0"]["input_casts"], r["tensorwise_saved,1"]["input_casts"]) == (0, 0)
    # but the weight is cast again as before: a kept copy of an all-gathered weight would outlive FSDP's reshard
    assert r["tensorwise_saved,1"]["weight_casts"] == r["tensorwise,1"]["weight_casts"] >= 1


# The fp8 inputs op-level AC keeps in FLUX's own blocks (diffusers' double and single block at width 512), in bytes,
# for the planner. Eager: each activation cast that the policy saves, summed over one forward. Compiled (per block,
# as the trainer does): the fp8 tensors the compiled blocks save for their backward.
KEPT = r"""
import contextlib, json, sys, torch
from torch.utils._python_dispatch import TorchDispatchMode
from fluxtrain import flow
from fluxtrain.config import ParallelConfig
from fluxtrain.models.flux import build_transformer
from fluxtrain.parallel.activation_checkpoint import apply_ac
from fluxtrain.parallel.compile import apply_compile

kw, batch, lat, text = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
compiled = sys.argv[5] == "1"


class Kept(TorchDispatchMode):
    nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float8_e4m3fn
                and args[0].dim() >= 3):
            self.nbytes += out.nbytes
        return out


torch.manual_seed(0)
model = build_transformer(kw, device="cpu")
n = convert(model, "tensorwise_saved")
apply_ac(model, ParallelConfig(activation_checkpointing="selective", ac_ops=True, fp8=True,
                               fp8_recipe="tensorwise_saved"))
model = model.to(torch.bfloat16)
if compiled:
    apply_compile(model)
x = flow.pack(torch.randn(batch, kw["in_channels"] // 4, lat, lat)).to(torch.bfloat16)
seq = torch.randn(batch, text, kw["joint_attention_dim"]).to(torch.bfloat16)
pooled = torch.randn(batch, kw["pooled_projection_dim"]).to(torch.bfloat16)
saved = {}


def pack(t):  # a compiled block is one autograd function: its saved tensors pass through these hooks
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t


k = Kept()  # eager only: under a dispatch mode, torch.compile would not compile the blocks
with contextlib.nullcontext() if compiled else k, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    model(**flow.transformer_inputs(x, torch.full((batch,), 0.5), seq, pooled, lat, lat, 1.0))
print("RESULT " + json.dumps(dict(converted=n, nbytes=sum(saved.values()) if compiled else k.nbytes)))
"""


@needs_torchao
@pytest.mark.parametrize("compiled", [False, True])
def test_the_planner_adds_the_fp8_inputs_op_level_ac_keeps(compiled):
    from fluxtrain.models.presets import TINY
    from fluxtrain.plan import GIB, predict

    kw = {**TINY, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 64, "num_attention_heads": 8,
          "axes_dims_rope": [16, 24, 24]}  # width 512: every block linear is eligible for fp8
    batch, res, text = 2, 64, 8
    r = run_with_torchao(KEPT, json.dumps(kw), str(batch), str(res // 8), str(text), str(int(compiled)))
    # double: q k v out, add_q add_k add_v add_out, ff ×2, ff_context ×2; single: q k v, proj_mlp, proj_out
    assert r["converted"] == 12 + 5
    args = ["--model.max_text_tokens", str(text), "--data.resolution", str(res), "--train.batch_size", str(batch),
            "--data.source", "cache", "--data.path", "x", "--parallel.activation_checkpointing", "selective",
            "--parallel.ac_ops", "true", "--parallel.fp8", "true", "--train.compile", str(compiled).lower()]
    plain = predict(C.load(None, args), 1, dict(kw)).activations_gib
    saved = predict(C.load(None, args + ["--parallel.fp8_recipe", "tensorwise_saved"]), 1, dict(kw)).activations_gib
    assert r["nbytes"] > 0 and (saved - plain) * GIB == pytest.approx(r["nbytes"], abs=1)
