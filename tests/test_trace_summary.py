"""`fluxtrain trace`: GPU busy/idle, kernel time by kind and exposed communication from a Chrome trace."""

import gzip
import json
import subprocess
import sys

import pytest

from fluxtrain.profiler import StepProfiler
from fluxtrain.trace_summary import kind, load, summarize
from tests.helpers import ROOT, env
from tests.test_profiler import _cfg, _loop


def _k(name, ts, dur, cat="kernel", stream=7):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def _synthetic():
    """Two 100 µs steps with the same kernels: a matmul 0–40, NCCL 30–60 on its own stream (10 µs overlapped),
    a Triton kernel 70–80, a copy 85–90; GPU idle 60–70, 80–85 and 90–100."""
    events = []
    for step, t0 in ((1, 0.0), (2, 100.0)):
        events.append({"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{step}", "ts": t0, "dur": 100.0})
        events += [_k("sm90_xmma_gemm_bf16bf16_bf16f32", t0, 40), _k("ncclDevKernel_AllGather_RING_LL", t0 + 30, 30,
                                                                    stream=20),
                   _k("triton_poi_fused_add_mul_0", t0 + 70, 10), _k("Memcpy DtoH", t0 + 85, 5, cat="gpu_memcpy")]
    return events


def test_synthetic_trace_adds_up():
    s = summarize(_synthetic())
    assert s["steps"] == 2 and s["gpu_kernels"] == 8
    assert s["wall_ms"] == pytest.approx(0.100)
    assert s["gpu_busy_ms"] == pytest.approx(0.075)  # 0–60, 70–80, 85–90
    assert s["gpu_idle_ms"] == pytest.approx(0.025)
    assert s["kernels_ms"] == pytest.approx({"matmul": 0.040, "communication": 0.030, "fused elementwise": 0.010,
                                             "copies": 0.005})
    assert s["exposed_communication_ms"] == pytest.approx(0.020)  # 40–60: nothing else ran
    top = s["top_kernels"]
    assert [(k, c) for _, k, c, _ in top] == [("matmul", 1), ("communication", 1), ("fused elementwise", 1),
                                              ("copies", 1)]  # per step, longest first
    assert top[0][0].startswith("sm90_xmma_gemm") and top[0][3] == pytest.approx(0.040)


@pytest.mark.parametrize("name, want", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_TNN", "matmul"),
    ("triton_tem_fused_addmm_3", "matmul"),
    ("triton_red_fused_native_layer_norm_2", "fused elementwise"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "communication"),
    ("void at::native::elementwise_kernel<128, 2>", "other"),
])
def test_kernel_kinds(name, want):
    assert kind(name, "kernel") == want


def test_a_real_cpu_trace_and_the_command_line(tmp_path):
    _loop(StepProfiler(_cfg([2, 3]), tmp_path, rank=0), steps=4)
    trace = tmp_path / "profile" / "trace-rank0-steps2-3.json.gz"
    with gzip.open(trace, "rt") as f:
        s = summarize(json.load(f)["traceEvents"])
    assert s["steps"] == 2 and s["wall_ms"] > 0 and s["gpu_kernels"] == 0
    res = subprocess.run([sys.executable, "-m", "fluxtrain", "trace", str(trace)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "2 profiled steps" in res.stdout and "no GPU kernels" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "fluxtrain", "trace", str(tmp_path / "nope.json.gz")], cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no trace at" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    # a trace copied mid-write, JSON of another shape, the profile folder itself: tracebacks or "no trace" before
    data = trace.read_bytes()
    cases = {"cut.json.gz": (data[: len(data) // 2], "ends early"), "n.json": (b"42", "no list of trace events"),
             "s.json": (b'{"traceEvents": "abc"}', "no list of trace events"),
             "o.json": (b'{"format": 1}', "no list of trace events")}
    for name, (raw, said) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=said):
            load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="is a folder: give one of its traces \\(trace-rank0-steps2-3"):
        load(tmp_path / "profile")
