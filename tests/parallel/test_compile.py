"""Per-block torch.compile: the compiled trainer follows the eager one; CUDA-graph mode is refused where it can't
work, in one line, before training."""

import json
import subprocess
import sys

import pytest

from fluxtrain import config as C
from tests.helpers import FAST, ROOT, env


@pytest.mark.parametrize("over, why", [
    ([], "train.compile is false"),
    (["--train.compile", "true", "--train.itc_weight", "0.1"], "train.itc_weight > 0"),
    (["--train.compile", "true", "--train.grad_accum", "2"], "train.grad_accum > 1"),
    (["--train.compile", "true", "--parallel.mixed_precision", "bf16"], "FSDP's hooks"),
    (["--train.compile", "true", "--parallel.mixed_precision", "fp32", "--parallel.cpu_offload", "true"],
     "FSDP's hooks"),
])
def test_cuda_graph_mode_is_refused_where_it_cannot_run(over, why):
    with pytest.raises(C.ConfigError, match="compile_mode = reduce-overhead can't be used here") as e:
        C.load(None, ["--train.compile_mode", "reduce-overhead", "--parallel.mixed_precision", "fp32"] + over)
    assert why in str(e.value) and "\n" not in str(e.value)
    C.load(None, ["--train.compile_mode", "reduce-overhead", "--train.compile", "true",
                  "--parallel.mixed_precision", "fp32"])  # one fp32 process: accepted


def _losses(tmp_path, name, compiled):
    out = tmp_path / name
    args = FAST + ["--train.steps", "4", "--train.device", "cpu", "--train.output_dir", str(out),
                   "--train.compile", str(compiled).lower(), "--eval.interval", "0", "--log.interval", "1"]
    res = subprocess.run([sys.executable, "-m", "fluxtrain", "train", "--config", "configs/tiny.toml", *args,
                          "--checkpoint.resume", "never"], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_compiled_blocks_train_like_eager(tmp_path):
    eager, compiled = _losses(tmp_path, "eager", False), _losses(tmp_path, "compiled", True)
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-3)
