"""One process in fp32 trains the plain module (FSDP2 would only add overhead); bf16, offload or more ranks shard.
That the unsharded run's losses equal the 2-rank FSDP run's is test_fsdp.py::test_strategies_match_single_process."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, env, free_port

CODE = """
import sys, torch.distributed as dist
from torch.distributed.tensor import DTensor
from fluxtrain import config as C
from fluxtrain.models.setup import build_training_model
from fluxtrain.parallel import mesh as pmesh
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
cfg = C.load(None, ["--model.preset", "tiny", "--train.device", "cpu"] + sys.argv[1:])
D = pmesh.init(cfg)
model = build_training_model(cfg, D.mesh, D.device)
print("SHARDED", all(isinstance(p, DTensor) for p in model.parameters()), any(isinstance(p, DTensor) for p in model.parameters()))
"""


@pytest.mark.parametrize("over, sharded", [
    (["--parallel.mixed_precision", "fp32"], False),
    (["--parallel.mixed_precision", "bf16"], True),  # FSDP's MixedPrecisionPolicy: the same numerics as N ranks
    (["--parallel.mixed_precision", "fp32", "--parallel.cpu_offload", "true"], True),
])
def test_one_fp32_process_is_unsharded(over, sharded):
    res = subprocess.run([sys.executable, "-c", CODE.format(port=free_port())] + over, cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("SHARDED")]
    assert line, res.stdout + res.stderr[-2000:]
    assert line[0] == f"SHARDED {sharded} {sharded}", line[0]
