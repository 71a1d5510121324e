"""bench/sync_count.py names the line of this repository's code behind each synchronizing call (the GPU part runs on
a GPU machine only; its refusal elsewhere and the naming are tested here)."""

import traceback

import pytest
import torch

from tests.helpers import ROOT, load_bench


def test_a_sync_is_named_by_our_innermost_line_and_the_call_it_made():
    where = load_bench("sync_count").where
    lib = "/usr/lib/python3/site-packages/torch/optim/adamw.py"
    stack = [traceback.FrameSummary(str(ROOT / "fluxtrain" / "cli.py"), 40, "main"),
             traceback.FrameSummary(str(ROOT / "fluxtrain" / "train.py"), 212, "queue_step"),
             traceback.FrameSummary(lib, 7, "step")]
    assert where(stack) == "fluxtrain/train.py:212 queue_step (→ adamw.py:7 step)"
    assert where(stack[:2]) == "fluxtrain/train.py:212 queue_step"  # our own line made the call
    assert where(stack[2:]) == f"{lib}:7"  # none of ours on the stack


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_it_says_so_before_training():
    with pytest.raises(SystemExit, match="counts CUDA synchronisations: run it on a GPU machine"):
        load_bench("sync_count").main(["--config", "configs/tiny.toml"])
