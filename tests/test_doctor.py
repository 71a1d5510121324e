"""`fluxtrain doctor` on a CPU-only machine, plus its parsers on canned nvidia-smi / sysfs output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxtrain import doctor

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[(OK|WARN|FAIL)\] .+ — .+$")


def _run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxtrain.doctor", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_quick_json_on_this_machine(tmp_path):
    out = _run("--quick", "--json", "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(out.stdout)
    assert rep["ok"] is True and rep["counts"]["FAIL"] == 0
    assert rep["torch"] == torch.__version__
    assert rep["write_mib_s"] > 0
    checks = {f["check"]: f for f in rep["findings"]}
    assert {"versions", "shm", "checkpoint-dir", "env", "infiniband"} <= set(checks)
    assert "bandwidth" not in checks  # --quick
    assert all(f["level"] in ("OK", "WARN", "FAIL") and f["todo"] for f in rep["findings"])
    if not torch.cuda.is_available():
        assert checks["gpus"]["level"] == "WARN" and "no CUDA GPU" in checks["gpus"]["what"]
    assert not list((tmp_path / "ckpt").iterdir()), "the write probe must be removed"


def test_lines_format(tmp_path, capsys):
    rc = doctor.main(["--quick", "--checkpoint-dir", str(tmp_path), "--write-mib", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert all(LINE.match(ln) for ln in lines[:-1]), lines
    assert re.match(r"^doctor: \d+ OK, \d+ WARN, 0 FAIL$", lines[-1])
    assert any(f"torch {torch.__version__}" in ln for ln in lines)
    assert any("MiB/s" in ln and str(tmp_path) in ln for ln in lines)


def test_unwritable_checkpoint_dir_fails(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # unwritable even for root
    rc = doctor.main(["--quick", "--checkpoint-dir", str(blocker / "ckpt"), "--write-mib", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    (fail,) = [ln for ln in out.splitlines() if ln.startswith("[FAIL]")]
    assert "cannot write checkpoints" in fail and "writable --checkpoint-dir" in fail
    assert out.strip().endswith("1 FAIL")


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU: the bandwidth test would run")
def test_full_run_without_gpu_skips_bandwidth(tmp_path, capsys):
    rc = doctor.main(["--json", "--checkpoint-dir", str(tmp_path), "--write-mib", "1"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0
    (bw,) = [f for f in rep["findings"] if f["check"] == "bandwidth"]
    assert bw["level"] == "WARN" and "skipped" in bw["what"]


def test_env_advice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    assert doctor.main(["--quick", "--checkpoint-dir", str(tmp_path), "--write-mib", "1"]) == 0
    out = capsys.readouterr().out
    for key in ("NCCL_P2P_DISABLE=1", "TORCH_NCCL_ASYNC_ERROR_HANDLING=0", "CUDA_DEVICE_MAX_CONNECTIONS=1"):
        (ln,) = [ln for ln in out.splitlines() if ln.startswith(f"[WARN] {key}")]
        assert " — " in ln


def test_small_shm_warns(tmp_path, monkeypatch):
    class St:  # 64 MiB, the Docker default
        f_blocks, f_frsize, f_bavail = 16384, 4096, 16384

    monkeypatch.setattr(doctor.os, "statvfs", lambda p: St())
    d = doctor.Doctor(doctor._parser().parse_args(["--checkpoint-dir", str(tmp_path)]))
    d.n_gpus = 8
    d.check_shm()
    (f,) = d.findings
    assert f.level == "WARN" and "--shm-size" in f.todo and "medium: Memory" in f.todo


def test_under_torchrun_cpu(tmp_path):
    """Two ranks on gloo: node checks once per node, one report from rank 0, exit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", "-m", "fluxtrain.doctor",
                          "--quick", "--json", "--checkpoint-dir", str(tmp_path), "--write-mib", "1"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(out.stdout)  # exactly one JSON document: rank 0's
    assert rep["world"]["world"] == 2 and rep["world"]["local_world"] == 2
    assert rep["torch"] == torch.__version__


# ----------------------------------------------------------------------------------------------- parsers

DGX_H100 = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tPIX\tSYS\t0-55,112-167\t0\t\tN/A
GPU1\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU2\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU3\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU4\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tSYS\tPIX\t56-111,168-223\t1\t\tN/A
GPU5\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tSYS\tSYS\t56-111,168-223\t1\t\tN/A
GPU6\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tSYS\tSYS\t56-111,168-223\t1\t\tN/A
GPU7\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tSYS\tSYS\t56-111,168-223\t1\t\tN/A
NIC0\tPIX\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\t X \tSYS
NIC1\tSYS\tSYS\tSYS\tSYS\tPIX\tSYS\tSYS\tSYS\tSYS\t X

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NV#  = Connection traversing a bonded set of # NVLinks

NIC Legend:

  NIC0: mlx5_0
  NIC1: mlx5_1
"""

PCIE_4 = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity
GPU0\t X \tPIX\tSYS\tSYS\t0-15\t0
GPU1\tPIX\t X \tSYS\tSYS\t0-15\t0
GPU2\tSYS\tSYS\t X \tPIX\t16-31\t1
GPU3\tSYS\tSYS\tPIX\t X \t16-31\t1
"""

NVL_PAIRS = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity
GPU0\t X \tNV12\tPHB\tPHB\t0-31\t0
GPU1\tNV12\t X \tPHB\tPHB\t0-31\t0
GPU2\tPHB\tPHB\t X \tNV12\t0-31\t0
GPU3\tPHB\tPHB\tNV12\t X \t0-31\t0
"""


def test_parse_topo_nvswitch():
    t = doctor.parse_topo(DGX_H100)
    assert t["gpus"] == 8 and t["kind"] == "nvlink" and t["min_nv"] == 18
    assert len(t["links"]) == 28
    assert t["numa"] == {i: "0" if i < 4 else "1" for i in range(8)}
    assert t["cpu_affinity"][4] == "56-111,168-223"
    assert t["nics"] == {"NIC0": "mlx5_0", "NIC1": "mlx5_1"}
    assert t["gpu_nic"][0] == "PIX" and t["gpu_nic"][1] == "SYS"
    exp, why = doctor.expected_busbw(t, None, 1, None)
    assert exp == pytest.approx(360) and "NV18" in why


# as seen on a 2 x H200 machine: nvidia-smi underlines the header with ANSI escapes
H200_X2 = ("\t\x1b[4mGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
           "GPU0\t X \tNV18\t0-31\t0\t\tN/A\nGPU1\tNV18\t X \t0-31\t0\t\tN/A\n\nLegend:\n\n  X    = Self\n")


def test_parse_topo_ansi_header():
    t = doctor.parse_topo(H200_X2)
    assert (t["gpus"], t["kind"], t["min_nv"], t["numa"]) == (2, "nvlink", 18, {0: "0", 1: "0"})


def test_parse_topo_pcie_and_partial_nvlink():
    t = doctor.parse_topo(PCIE_4)
    assert t["kind"] == "pcie-sys" and t["numa"] == {0: "0", 1: "0", 2: "1", 3: "1"}
    exp, why = doctor.expected_busbw(t, 4, 1, None)
    assert exp < 20 and "CPU sockets" in why
    t = doctor.parse_topo(NVL_PAIRS)
    assert t["kind"] == "nvlink-partial"
    assert doctor.parse_topo("")["kind"] == "unknown"
    assert doctor.parse_topo(PCIE_4.replace("\t", "   "))["kind"] == "pcie-sys"  # space-aligned variant


def test_expected_busbw_multinode():
    t = doctor.parse_topo(DGX_H100)
    exp, why = doctor.expected_busbw(t, None, 2, 8 * 400 / 8)  # 8 x 400 Gb/s NDR per node
    assert exp == pytest.approx(320) and "IB/RoCE" in why
    exp, why = doctor.expected_busbw(t, None, 2, 0.0)
    assert exp < 5 and "TCP" in why
    assert doctor.expected_busbw(None, None, 1, None) is None


def _fake_port(root: Path, dev: str, port: str, state: str, rate: str, layer: str) -> None:
    p = root / dev / "ports" / port
    p.mkdir(parents=True)
    (p / "state").write_text(state + "\n")
    (p / "rate").write_text(rate + "\n")
    (p / "link_layer").write_text(layer + "\n")


def test_read_infiniband(tmp_path):
    _fake_port(tmp_path, "mlx5_0", "1", "4: ACTIVE", "400 Gb/sec (4X NDR)", "InfiniBand")
    _fake_port(tmp_path, "mlx5_1", "1", "1: DOWN", "10 Gb/sec (4X SDR)", "InfiniBand")
    ports = doctor.read_infiniband(tmp_path)
    assert [(p["dev"], p["state"], p["gbps"]) for p in ports] == [("mlx5_0", "ACTIVE", 400.0), ("mlx5_1", "DOWN", 10.0)]
    assert doctor.read_infiniband(tmp_path / "missing") == []


def test_infiniband_findings(tmp_path, monkeypatch):
    _fake_port(tmp_path, "mlx5_0", "1", "4: ACTIVE", "200 Gb/sec (4X HDR)", "Ethernet")
    monkeypatch.setenv("FLUXTRAIN_DOCTOR_IB_ROOT", str(tmp_path))
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    d = doctor.Doctor(doctor._parser().parse_args([]))
    d.check_infiniband()
    assert d.ib_gbs == 25.0
    assert d.findings[0].level == "WARN" and "NCCL_IB_DISABLE" in d.findings[0].what


def test_dist_env():
    assert doctor.dist_env({})["world"] == 1
    e = doctor.dist_env({"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"})
    assert e == dict(rank=9, world=16, local_rank=1, local_world=8, nnodes=2)
    e = doctor.dist_env({"SLURM_NTASKS": "32", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
                         "SLURM_NTASKS_PER_NODE": "8(x4)", "MASTER_ADDR": "n1", "SLURM_NNODES": "4"})
    assert e == dict(rank=3, world=32, local_rank=3, local_world=8, nnodes=4)
