"""StepProfiler: a trace of exactly the configured steps, per rank as configured; memory snapshot on CUDA only."""

import gzip
import json
import logging
import pickle
import types

import pytest
import torch

from fluxtrain.profiler import StepProfiler, profile_range

MATMULS_PER_STEP = 3


def _cfg(steps, ranks="rank0"):
    return types.SimpleNamespace(profile_steps=steps, profile_ranks=ranks)


def _loop(prof, steps, first=1, device="cpu"):
    a = torch.randn(32, 32, device=device)
    for step in range(first, steps + 1):
        for _ in range(MATMULS_PER_STEP):
            a = torch.tanh(a @ a)
        prof.step(step)
    prof.close()


def _events(path):
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    assert isinstance(data["traceEvents"], list) and data["traceEvents"]
    return data["traceEvents"]


def _ops(events, name):
    return [e for e in events if e.get("name") == name and e.get("ph") == "X"]


def test_trace_covers_exactly_the_profiled_steps(tmp_path):
    _loop(StepProfiler(_cfg([2, 3]), tmp_path, rank=0), steps=5)
    trace = tmp_path / "profile" / "trace-rank0-steps2-3.json.gz"
    assert sorted(p.name for p in (tmp_path / "profile").iterdir())[0] == trace.name
    events = _events(trace)
    steps = sorted({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert len(_ops(events, "aten::mm")) == 2 * MATMULS_PER_STEP  # steps 2 and 3, not 1, 4 or 5
    assert any("Input Dims" in e.get("args", {}) for e in _ops(events, "aten::mm"))  # record_shapes


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_writes_no_memory_snapshot_and_says_so(tmp_path, caplog):
    logger = logging.getLogger("fluxtrain")
    logger.addHandler(caplog.handler)  # setup_logging() may have turned propagation off in an earlier test
    try:
        with caplog.at_level(logging.INFO, logger="fluxtrain"):
            _loop(StepProfiler(_cfg([1, 1]), tmp_path, rank=0), steps=2)
    finally:
        logger.removeHandler(caplog.handler)
    assert [p.name for p in (tmp_path / "profile").iterdir()] == ["trace-rank0-steps1-1.json.gz"]
    said = {id(r) for r in caplog.records if "no memory snapshot on CPU" in r.getMessage()}
    assert len(said) == 1


def test_off_and_rank_selection(tmp_path):
    _loop(StepProfiler(_cfg([]), tmp_path / "off", rank=0), steps=3)
    _loop(StepProfiler(_cfg([1, 2], "rank0"), tmp_path / "r1", rank=1), steps=3)
    assert not (tmp_path / "off" / "profile").exists()
    assert not (tmp_path / "r1" / "profile").exists()
    _loop(StepProfiler(_cfg([1, 2], "all"), tmp_path / "all", rank=1), steps=3)
    assert (tmp_path / "all" / "profile" / "trace-rank1-steps1-2.json.gz").exists()


def test_resume_inside_range_and_cut_short(tmp_path):
    # resumed after step 3 with range [2, 6], stopped after step 5: steps 4-5 are written on close()
    _loop(StepProfiler(_cfg([2, 6]), tmp_path, rank=0, start_step=3), steps=5, first=4)
    events = _events(tmp_path / "profile" / "trace-rank0-steps4-5.json.gz")
    assert len(_ops(events, "aten::mm")) == 2 * MATMULS_PER_STEP
    # resumed past the range: nothing
    _loop(StepProfiler(_cfg([1, 2]), tmp_path / "late", rank=0, start_step=5), steps=7, first=6)
    assert not (tmp_path / "late" / "profile").exists()


def test_profile_steps_validation():
    from fluxtrain.config import ConfigError

    assert profile_range([]) is None and profile_range([4]) == (4, 4) and profile_range([2, 3]) == (2, 3)
    for bad in ([3, 2], [0, 1], [1, 2, 3]):
        with pytest.raises(ConfigError, match="log.profile_steps"):
            profile_range(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory snapshot needs a GPU")
def test_cuda_memory_snapshot(tmp_path):
    _loop(StepProfiler(_cfg([2, 3]), tmp_path, rank=0), steps=4, device="cuda")
    events = _events(tmp_path / "profile" / "trace-rank0-steps2-3.json.gz")
    assert any(e.get("cat") == "kernel" for e in events)
    with open(tmp_path / "profile" / "memory-rank0.pickle", "rb") as f:
        snap = pickle.load(f)
    assert "segments" in snap and "device_traces" in snap
    assert any(len(t) for t in snap["device_traces"])  # allocations of the profiled steps were recorded
