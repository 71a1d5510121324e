"""bench/train_step.live_tensors: the hunt for what keeps an earlier variant's memory allocated names each large
tensor's holder, and forgets a tensor once nothing holds it."""

import sys
import types

import torch

from tests.helpers import load_bench


def load_train_step():
    return load_bench("train_step")


class Holder:
    pass


def test_live_tensors_name_their_holders():
    ts = load_train_step()
    h = Holder()
    h.weights = torch.zeros(3, 700_001)  # shapes no other test makes, 8.0 and 16.0 MiB
    mod = types.ModuleType("leaky_module")
    mod.ring = torch.zeros(5, 838_861)
    sys.modules["leaky_module"] = mod
    try:
        lines = ts.live_tensors("cpu", 2**23, limit=1000)
        mine = {line.split(")")[0].split("(")[-1]: line for line in lines if "700001" in line or "838861" in line}
        assert set(mine) == {"3, 700001", "5, 838861"}, lines
        assert mine["3, 700001"].endswith("held by Holder")
        assert "dict of leaky_module" in mine["5, 838861"]
        assert mine["5, 838861"].startswith("  16 MiB")
    finally:
        del sys.modules["leaky_module"]
    del h, mod
    assert not [line for line in ts.live_tensors("cpu", 2**23, limit=1000) if "700001" in line or "838861" in line]


def test_an_offloaded_optimizers_rows_are_paced_by_the_drained_streams():
    ts = load_train_step()
    # gpu_run49 (12B, one H200, fp32 moments): compute-stream median 0.975 s, every stream drained 2.806 s per step
    assert ts.paced_step(0.975, 2.806, optimizer_offload=True) == 2.806
    # resident rows keep the median, robust to one slow step (the third-depth resident row after gpu_run49: 0.509 s
    # median, 0.507 s drained)
    assert ts.paced_step(0.509, 0.507, optimizer_offload=False) == 0.509
    assert ts.paced_step(0.509, 0.9, optimizer_offload=False) == 0.509


def test_the_leftover_is_grouped_by_where_it_was_allocated(monkeypatch):
    ts = load_train_step()
    frame = lambda f, line, name: {"filename": f, "line": line, "name": name}  # noqa: E731
    snap = {"segments": [{"blocks": [
        {"state": "active_allocated", "size": 3 << 30,
         "frames": [frame("/t/_fsdp_param.py", 10, "shard"), frame("/t/lib.so", 0, "alloc")]},
        {"state": "active_allocated", "size": 1 << 30, "frames": [frame("/t/_fsdp_param.py", 10, "shard")]},
        {"state": "inactive", "size": 5 << 30, "frames": [frame("/t/cache.py", 1, "free")]},  # freed: not counted
        # older torch keeps the frames in the block's history
        {"state": "active_allocated", "size": 1 << 29, "history": [{"frames": [frame("/f/optim.py", 3, "ring")]}]},
    ]}]}
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: snap)
    assert ts.leftover_stacks() == ["  4.00 GiB in 2 blocks, allocated at: _fsdp_param.py:10 shard",
                                    "  0.50 GiB in 1 blocks, allocated at: optim.py:3 ring"]
