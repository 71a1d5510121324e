"""`fluxtrain doctor`: what is wrong with this machine (or cluster) for training, and how to fix it.

Every finding is one line ``[OK|WARN|FAIL] what — what to do``. The exit code is 1 when any check FAILs, else 0.
Nothing here needs a GPU: on a CPU-only machine the GPU checks say so with a WARN.

Checks: torch/CUDA/NCCL and package versions; GPUs (count, model, memory, bf16); topology (`nvidia-smi topo -m`:
NVLink vs PCIe, NUMA); InfiniBand/RoCE (/sys/class/infiniband, GPUDirect RDMA); /dev/shm size; checkpoint-dir
write speed (write + fsync); CPU cores per GPU; NCCL/CUDA/OMP environment variables; and, unless ``--quick``, an
all-reduce and all-gather bus-bandwidth test across the local GPUs (one process per GPU, NCCL) or, under
torchrun / srun (WORLD_SIZE > 1), across all ranks, compared with what the topology should give.

Bus bandwidth follows nccl-tests: algbw = bytes / time; all-reduce busbw = algbw·2(n-1)/n, all-gather (bytes = the
gathered output) busbw = algbw·(n-1)/n. busbw is comparable with the link's own speed whatever n is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GiB = 1024**3
MiB = 1024**2

# FLUX.1-dev transformer: ~11.9e9 parameters. AdamW with fp32 master weights + 2 fp32 moments + fp32 grads =
# 16 bytes/param, sharded over the world by FULL_SHARD; a DCP checkpoint holds params + moments = 12 bytes/param.
FLUX_DEV_PARAMS = 11.9e9
STATE_BYTES_PER_PARAM = 16
CKPT_BYTES_PER_PARAM = 12
NVLINK_GBS_PER_LINK = 25.0  # NVLink 2/3/4: 25 GB/s per link per direction
PCIE_X16_GBS = {3: 16.0, 4: 32.0, 5: 64.0, 6: 128.0}  # per direction, theoretical


@dataclass
class Finding:
    level: str
    check: str
    what: str
    todo: str = "nothing to do"
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"[{self.level}] {self.what} — {self.todo}"


# ----------------------------------------------------------------------------------------------------- helpers


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    """stdout of a command, or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def dist_env(env: dict | None = None) -> dict[str, int]:
    """rank / world / local rank / local world / nodes from torchrun (or accelerate), else from srun (Slurm)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        world = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        world, rank = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0].split(",")[0])
    else:
        world, rank, local_rank, local_world = 1, 0, 0, 1
    nnodes = max(1, math.ceil(world / max(1, local_world)))
    for key in ("NNODES", "PET_NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        v = env.get(key, "")
        if v.isdigit():
            nnodes = max(nnodes, int(v))
            break
    return dict(rank=rank, world=world, local_rank=local_rank, local_world=local_world, nnodes=nnodes)


# ------------------------------------------------------------------------------------------- pure parsers


def parse_topo(text: str) -> dict:
    """Parse `nvidia-smi topo -m`.

    Returns {"gpus": n, "links": {"0-1": "NV18", ...}, "numa": {gpu: "0"}, "cpu_affinity": {gpu: "0-55"},
    "nics": {"NIC0": "mlx5_0"}, "gpu_nic": {gpu: best link to any NIC}, "kind": "nvlink" | "nvlink-partial" |
    "pcie" | "pcie-sys" | "single", "min_nv": smallest NV# over GPU pairs (0 when some pair has none)}.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # nvidia-smi underlines the header with ANSI codes
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # nvidia-smi underlines the header on a terminal-ish stdout
    lines = [ln.rstrip("\n") for ln in text.splitlines()]
    header_i = next((i for i, ln in enumerate(lines) if re.search(r"\tGPU0\b", ln) or re.match(r"\s+GPU0\s", ln)), None)
    res: dict = {"gpus": 0, "links": {}, "numa": {}, "cpu_affinity": {}, "nics": {}, "gpu_nic": {}, "kind": "unknown",
                 "min_nv": 0}
    if header_i is None:
        return res
    sep = "\t" if "\t" in lines[header_i] else None
    header = [c.strip() for c in (lines[header_i].split(sep) if sep else re.split(r"\s{2,}", lines[header_i]))]
    header = [c for c in header if c]
    devs = [c for c in header if re.fullmatch(r"(GPU|NIC)\d+", c)]
    gpus = [c for c in devs if c.startswith("GPU")]
    for ln in lines[header_i + 1:]:
        m = re.match(r"^(GPU\d+|NIC\d+)\s", ln)
        if not m:
            if ln.strip().startswith("Legend"):
                break
            continue
        row = m.group(1)
        cells = [c.strip() for c in (ln.split(sep)[1:] if sep else ln.split()[1:])]
        links, rest = cells[: len(devs)], [c for c in cells[len(devs):] if c]
        if not row.startswith("GPU"):
            continue
        gi = int(row[3:])
        for dev, link in zip(devs, links):
            if dev.startswith("GPU") and int(dev[3:]) > gi:
                res["links"][f"{gi}-{int(dev[3:])}"] = link
        nic_links = [link for dev, link in zip(devs, links) if dev.startswith("NIC")]
        if nic_links:
            order = ["PIX", "PXB", "PHB", "NODE", "SYS"]
            res["gpu_nic"][gi] = min(nic_links, key=lambda x: order.index(x) if x in order else len(order))
        if rest:
            res["cpu_affinity"][gi] = rest[0]
        if len(rest) > 1:
            res["numa"][gi] = rest[1]
    for ln in lines:
        m = re.match(r"\s*(NIC\d+):\s*(\S+)", ln)
        if m:
            res["nics"][m.group(1)] = m.group(2)
    res["gpus"] = len(gpus)
    vals = list(res["links"].values())
    nv = [int(v[2:]) for v in vals if re.fullmatch(r"NV\d+", v)]
    if len(gpus) <= 1:
        res["kind"] = "single"
    elif nv and len(nv) == len(vals):
        res["kind"], res["min_nv"] = "nvlink", min(nv)
    elif nv:
        res["kind"] = "nvlink-partial"
    elif "SYS" in vals:
        res["kind"] = "pcie-sys"
    else:
        res["kind"] = "pcie"
    return res


def read_infiniband(root: str | Path = "/sys/class/infiniband") -> list[dict]:
    """[{"dev": "mlx5_0", "port": "1", "state": "ACTIVE", "gbps": 400.0, "link_layer": "InfiniBand"}, ...]."""
    root = Path(root)
    ports = []
    if not root.is_dir():
        return ports
    for dev in sorted(root.iterdir()):
        pdir = dev / "ports"
        if not pdir.is_dir():
            continue
        for port in sorted(pdir.iterdir()):
            state = _read(port / "state")  # "4: ACTIVE"
            rate = _read(port / "rate")  # "400 Gb/sec (4X NDR)"
            m = re.match(r"([\d.]+)\s*Gb", rate)
            ports.append({"dev": dev.name, "port": port.name, "state": state.split(":")[-1].strip() or "UNKNOWN",
                          "gbps": float(m.group(1)) if m else 0.0, "link_layer": _read(port / "link_layer") or "?"})
    return ports


def expected_busbw(topo: dict | None, pcie_gen: int | None, nnodes: int,
                   ib_gbs: float | None) -> tuple[float, str] | None:
    """Rough large-message busbw (GB/s) this hardware should give, and why. None when unknown."""
    intra = None
    if topo and topo.get("kind") == "nvlink":
        intra = (0.8 * NVLINK_GBS_PER_LINK * topo["min_nv"], f"NVLink NV{topo['min_nv']} between every GPU pair")
    elif topo and topo.get("kind") in ("pcie", "pcie-sys", "nvlink-partial"):
        gen = pcie_gen or 4
        bw = 0.7 * PCIE_X16_GBS.get(gen, 32.0)
        why = f"PCIe Gen{gen} x16"
        if topo["kind"] == "pcie-sys":
            bw, why = bw * 0.5, why + " crossing CPU sockets"
        elif topo["kind"] == "nvlink-partial":
            why = "NVLink on some pairs only, rings cross " + why
        intra = (bw, why)
    if nnodes <= 1:
        return intra
    net = (0.8 * ib_gbs, f"{ib_gbs:.0f} GB/s of active IB/RoCE ports per node") if ib_gbs else (2.0, "TCP sockets")
    if intra is None or net[0] < intra[0]:
        return net
    return intra


# ------------------------------------------------------------------------------------------------- checks


class Doctor:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.findings: list[Finding] = []
        self.d = dist_env()
        self.n_gpus = 0
        self.topo: dict | None = None
        self.pcie_gen: int | None = None
        self.ib_gbs: float = 0.0
        self.ib_present = False

    def add(self, level: str, check: str, what: str, todo: str = "nothing to do", **data) -> None:
        self.findings.append(Finding(level, check, what, todo, data))

    def run_local(self) -> None:
        for check in (self.check_versions, self.check_gpus, self.check_topology, self.check_infiniband,
                      self.check_shm, self.check_checkpoint_dir, self.check_cpus, self.check_env):
            try:
                check()
            except Exception as e:  # a broken check must not hide the others
                self.add(WARN, check.__name__.removeprefix("check_"), f"{check.__name__} crashed: {e!r}",
                         "report this as a fluxtrain bug; the other checks are still valid")

    # versions
    def check_versions(self) -> None:
        import importlib.metadata as md

        import torch

        v = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": None, "nccl": None, "driver": None}
        try:
            v["cudnn"] = torch.backends.cudnn.version()
        except Exception:
            pass
        try:
            n = torch.cuda.nccl.version()
            v["nccl"] = ".".join(map(str, n)) if isinstance(n, tuple) else str(n)
        except Exception:
            pass
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if smi:
            v["driver"] = smi.splitlines()[0].strip()
        desc = (f"python {v['python']}, torch {v['torch']}, CUDA {v['cuda'] or 'none (CPU build)'}, "
                f"NCCL {v['nccl'] or 'n/a'}, driver {v['driver'] or 'n/a'}")
        if _version_tuple(torch.__version__) < (2, 6):
            self.add(FAIL, "versions", desc + " — FSDP2 (fully_shard) needs torch >= 2.6",
                     "pip install -U 'torch>=2.6' (the Docker image pins a tested version)", **v)
        elif smi and not v["cuda"]:
            self.add(FAIL, "versions", desc + " — GPUs present but torch is a CPU-only build",
                     "install a CUDA wheel: pip install torch --index-url https://download.pytorch.org/whl/cu128",
                     **v)
        else:
            self.add(OK, "versions", desc, **v)
        missing, pkgs = [], {}
        for name in ("diffusers", "transformers", "accelerate", "safetensors", "webdataset", "peft"):
            try:
                pkgs[name] = md.version(name)
            except md.PackageNotFoundError:
                missing.append(name)
        if missing:
            self.add(FAIL, "packages", f"missing packages: {', '.join(missing)}",
                     "pip install . (from the repo) or use the Docker image", **pkgs)
        else:
            self.add(OK, "packages", ", ".join(f"{k} {v}" for k, v in pkgs.items()), **pkgs)

    # GPUs
    def check_gpus(self) -> None:
        import torch

        smi_count = _run(["nvidia-smi", "-L"])
        smi_n = len([ln for ln in (smi_count or "").splitlines() if ln.startswith("GPU ")])
        if not torch.cuda.is_available():
            if smi_n and torch.version.cuda:
                self.add(FAIL, "gpus", f"nvidia-smi lists {smi_n} GPU(s) but torch cannot use them",
                         f"the driver is too old for torch's CUDA {torch.version.cuda} or CUDA_VISIBLE_DEVICES hides "
                         "them: upgrade the driver or install a torch wheel for an older CUDA", gpus=0)
            else:
                self.add(WARN, "gpus", "no CUDA GPU visible — training falls back to CPU (tiny config only)",
                         "on a GPU host check `nvidia-smi`, the driver, CUDA_VISIBLE_DEVICES, `docker run --gpus all`"
                         " or the pod's nvidia.com/gpu limit", gpus=0)
            return
        n = self.n_gpus = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(n)]
        names = sorted({p.name for p in props})
        mem = min(p.total_memory for p in props) / GiB
        cc = min((p.major, p.minor) for p in props)
        info = dict(gpus=n, names=[p.name for p in props], mem_gib=[round(p.total_memory / GiB, 1) for p in props],
                    compute_capability=f"{cc[0]}.{cc[1]}")
        desc = f"{n} GPU(s): {', '.join(names)}, {mem:.0f} GiB each, compute capability {cc[0]}.{cc[1]}"
        if len(names) > 1:
            self.add(WARN, "gpus", desc + " — mixed GPU models",
                     "the slowest GPU paces every FSDP step: use one model per job (CUDA_VISIBLE_DEVICES)", **info)
        elif cc < (8, 0):
            self.add(WARN, "gpus", desc + " — no native bf16 (needs Ampere or newer)",
                     "run with --mixed_precision fp32, or use A100/H100-class GPUs", **info)
        else:
            self.add(OK, "gpus", desc, **info)
        # memory other processes already hold (nvidia-smi: no CUDA context needed here)
        q = _run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total,pcie.link.gen.max",
                  "--format=csv,noheader,nounits"])
        busy = []
        for ln in (q or "").splitlines():
            parts = [p.strip() for p in ln.split(",")]
            if len(parts) >= 4 and parts[1].isdigit() and parts[2].isdigit():
                if int(parts[1]) > 0.1 * int(parts[2]):
                    busy.append(f"GPU{parts[0]} {int(parts[1]) / 1024:.1f} GiB")
                if parts[3].isdigit():
                    self.pcie_gen = int(parts[3])
        if busy and self.d["world"] == 1:
            self.add(WARN, "gpu-memory", "memory already in use: " + ", ".join(busy),
                     "another process holds these GPUs (see `nvidia-smi`): stop it or expect OOM / slow steps")
        # can this node hold a FLUX.1-dev full fine-tune?
        states_gb = FLUX_DEV_PARAMS * STATE_BYTES_PER_PARAM / 1e9
        need = math.ceil(states_gb / (0.6 * mem * GiB / 1e9))
        world_gpus = max(n, self.d["world"])
        what = (f"FLUX.1-dev full fine-tune: ~{states_gb:.0f} GB of params+grads+AdamW states (16 B/param) "
                f"÷ world; with {mem:.0f} GiB GPUs that needs >= {need} GPUs (FULL_SHARD), here {world_gpus}")
        if world_gpus < need:
            self.add(WARN, "memory-plan", what,
                     "add nodes, or set parallel.cpu_offload=true, or train LoRA; check with "
                     f"`fluxtrain plan --config configs/flux-dev.toml --gpus {world_gpus} --gpu-mem-gib {mem:.0f}`")
        else:
            self.add(OK, "memory-plan", what, "use parallel.activation_checkpointing to fit larger batches")

    # topology
    def check_topology(self) -> None:
        if self.n_gpus == 0:
            return
        out = _run(["nvidia-smi", "topo", "-m"])
        if out is None:
            self.add(WARN, "topology", "`nvidia-smi topo -m` unavailable — cannot tell NVLink from PCIe",
                     "install the NVIDIA driver utilities (in containers: NVIDIA_DRIVER_CAPABILITIES=compute,utility)")
            return
        t = self.topo = parse_topo(out)
        data = {k: t[k] for k in ("kind", "min_nv", "numa", "nics", "gpu_nic")}
        if t["kind"] == "single":
            self.add(OK, "topology", "1 GPU: no GPU-to-GPU links to check", **data)
        elif t["kind"] == "nvlink":
            self.add(OK, "topology", f"all {t['gpus']} GPUs linked by NVLink (NV{t['min_nv']} per pair; NVSwitch or "
                     "full mesh)", "if bus bandwidth is low on an NVSwitch system, check `systemctl status "
                     "nvidia-fabricmanager`", **data)
        elif t["kind"] == "nvlink-partial":
            self.add(WARN, "topology", "NVLink joins only some GPU pairs; collectives over all GPUs cross PCIe",
                     "expect PCIe-bound all-gathers; keep shard groups inside NVLink islands (parallel.strategy="
                     "HYBRID_SHARD with parallel.shard_size) or use an NVSwitch host", **data)
        else:
            self.add(WARN, "topology", "no NVLink: GPUs talk over PCIe" +
                     (" and across CPU sockets (SYS)" if t["kind"] == "pcie-sys" else ""),
                     "12B FSDP training will be communication-bound: prefer NVLink/NVSwitch hosts, raise the "
                     "per-GPU batch, or try parallel.strategy=SHARD_GRAD_OP", **data)
        numa = sorted(set(t["numa"].values()) - {"N/A", ""})
        if len(numa) > 1:
            self.add(OK, "numa", f"GPUs sit on NUMA nodes {', '.join(numa)}",
                     "bind each rank near its GPU: torchrun --numa-binding node (recent torch), or numactl")

    # InfiniBand / RoCE
    def check_infiniband(self) -> None:
        ports = read_infiniband(os.environ.get("FLUXTRAIN_DOCTOR_IB_ROOT", "/sys/class/infiniband"))
        multi = self.d["nnodes"] > 1
        self.ib_present = bool(ports)
        if not ports:
            if multi:
                self.add(WARN, "infiniband", f"{self.d['nnodes']} nodes but no InfiniBand/RoCE device",
                         "NCCL falls back to TCP sockets (~1-3 GB/s): multi-node FSDP will be network-bound; use "
                         "IB/RoCE nodes (containers: mount /dev/infiniband, k8s RDMA device plugin)", ports=[])
            else:
                self.add(OK, "infiniband", "no InfiniBand/RoCE device (not needed on one node)",
                         "for multi-node jobs use IB/RoCE-connected nodes", ports=[])
            return
        active = [p for p in ports if p["state"] == "ACTIVE"]
        self.ib_gbs = sum(p["gbps"] for p in active) / 8
        desc = ", ".join(f"{p['dev']}/{p['port']} {p['state']} {p['gbps']:.0f} Gb/s {p['link_layer']}" for p in ports)
        if not active:
            self.add(WARN, "infiniband", f"RDMA devices but no ACTIVE port: {desc}",
                     "check cables and the subnet manager (`ibstat`); NCCL will use TCP sockets", ports=ports)
        elif os.environ.get("NCCL_IB_DISABLE") == "1":
            self.add(WARN, "infiniband", f"{desc}; but NCCL_IB_DISABLE=1", "unset NCCL_IB_DISABLE so NCCL uses RDMA",
                     ports=ports)
        else:
            roce = any(p["link_layer"] == "Ethernet" for p in active)
            self.add(OK, "infiniband", f"{desc} = {self.ib_gbs:.0f} GB/s per node",
                     "RoCE: set NCCL_IB_GID_INDEX (often 3) if NCCL picks the wrong GID" if roce else
                     "check NCCL picks them: NCCL_DEBUG=INFO shows 'NET/IB'", ports=ports, gbs=self.ib_gbs)
        if active and not Path("/dev/infiniband").exists():
            self.add(WARN, "infiniband", "RDMA devices visible but /dev/infiniband is missing (container?)",
                     "docker run --device=/dev/infiniband --cap-add=IPC_LOCK, or the k8s RDMA device plugin")
        gdr = any(Path("/sys/module", m).exists() for m in ("nvidia_peermem", "nv_peer_mem"))
        if active and self.n_gpus and not gdr:
            self.add(WARN, "gpudirect", "GPUDirect RDMA module (nvidia_peermem) not loaded",
                     "on the host: `modprobe nvidia_peermem` (or DMA-BUF with a recent driver); without GDR NCCL "
                     "stages through host memory")

    # /dev/shm
    def check_shm(self) -> None:
        need = max(1, self.n_gpus) * GiB
        try:
            st = os.statvfs("/dev/shm")
        except OSError:
            self.add(WARN, "shm", "/dev/shm missing", "mount a tmpfs at /dev/shm (docker --shm-size=16g, k8s emptyDir "
                     "medium: Memory) — DataLoader workers and NCCL need it")
            return
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        what = f"/dev/shm {size / GiB:.1f} GiB ({free / GiB:.1f} GiB free)"
        if size < need:
            self.add(WARN, "shm", f"{what}, below 1 GiB per GPU ({need / GiB:.0f} GiB)",
                     "DataLoader workers and NCCL's shared-memory transport fail with 'Bus error': docker run "
                     "--shm-size=16g (or --ipc=host); k8s: emptyDir {medium: Memory} at /dev/shm",
                     shm_bytes=size, shm_free=free)
        else:
            self.add(OK, "shm", what, shm_bytes=size, shm_free=free)

    # checkpoint directory
    def check_checkpoint_dir(self) -> None:
        d = Path(self.args.checkpoint_dir)
        nbytes = int(self.args.write_mib * MiB)
        probe = d / f".fluxtrain-doctor-{socket.gethostname()}-{os.getpid()}.tmp"
        fix = ("pass a writable --checkpoint-dir (and train.output_dir), e.g. a shared volume such as "
               "/mnt/shared/runs; in containers check the volume mount and its owner (uid)")
        try:
            d.mkdir(parents=True, exist_ok=True)
            chunk = os.urandom(min(nbytes, 16 * MiB))
            t0 = time.perf_counter()
            with open(probe, "wb", buffering=0) as f:
                left = nbytes
                while left > 0:
                    left -= f.write(chunk[: min(left, len(chunk))])
                os.fsync(f.fileno())
            dt = time.perf_counter() - t0
        except OSError as e:
            self.add(FAIL, "checkpoint-dir", f"cannot write checkpoints to {d}: {e.strerror or e}", fix,
                     path=str(d), error=str(e))
            return
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
        speed = nbytes / MiB / max(dt, 1e-9)
        free = shutil.disk_usage(d).free
        ckpt_gb = FLUX_DEV_PARAMS * CKPT_BYTES_PER_PARAM / 1e9
        what = (f"{d}: wrote {nbytes / MiB:.0f} MiB + fsync at {speed:.0f} MiB/s, {free / 1e9:.0f} GB free "
                f"(a FLUX.1-dev checkpoint is ~{ckpt_gb:.0f} GB: ~{ckpt_gb * 1e3 / speed / 60:.0f} min from one writer "
                "at this speed, less with all ranks writing)")
        data = dict(path=str(d), write_mib_s=round(speed, 1), free_bytes=free)
        if free < 10 * GiB:
            self.add(WARN, "checkpoint-dir", what + " — nearly full", "free space or point train.output_dir at a "
                     "larger volume; keep checkpoint.keep small", **data)
        elif speed < 200:
            self.add(WARN, "checkpoint-dir", what + " — slow", "use local NVMe or a parallel filesystem (Lustre/GPFS/"
                     "fast NFS), keep checkpoint.async_save=true and a larger checkpoint.interval", **data)
        else:
            self.add(OK, "checkpoint-dir", what, **data)

    # CPUs
    def check_cpus(self) -> None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        per = cores / max(1, self.n_gpus)
        what = f"{cores} CPU cores usable" + (f", {per:.0f} per GPU" if self.n_gpus else "")
        if self.n_gpus and per < 4:
            self.add(WARN, "cpus", what, "image decoding and VAE/text encoding can starve the GPUs: precompute with "
                     "`fluxtrain cache` and train with data.source=cache", cores=cores)
        else:
            self.add(OK, "cpus", what, cores=cores)

    # environment variables
    def check_env(self) -> None:
        env = os.environ
        shown = {k: v for k, v in sorted(env.items()) if k.startswith(("NCCL_", "TORCH_NCCL_")) or k in (
            "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")}
        self.add(OK, "env", "environment: " + (", ".join(f"{k}={v}" for k, v in shown.items()) or "no NCCL/CUDA "
                 "tuning variables set"), "the defaults suit most clusters" + ("; risky ones are flagged below"
                                                                               if shown else ""), **shown)
        advice = {
            "NCCL_P2P_DISABLE": (lambda v: v == "1", WARN, "turns off NVLink/PCIe peer-to-peer: collectives go "
                                 "through host memory", "unset it (only for debugging broken P2P/ACS)"),
            "NCCL_SHM_DISABLE": (lambda v: v == "1", WARN, "turns off NCCL's shared-memory transport",
                                 "unset it unless /dev/shm cannot be enlarged"),
            "NCCL_IB_DISABLE": (lambda v: v == "1" and self.d["nnodes"] > 1 and not self.ib_present, WARN,
                                "multi-node over TCP sockets", "use RDMA-capable nodes and unset NCCL_IB_DISABLE"),
            "NCCL_DEBUG": (lambda v: v.upper() in ("INFO", "TRACE"), OK, "verbose NCCL logs",
                           "good for diagnosing; set NCCL_DEBUG=WARN for long runs"),
            "NCCL_ASYNC_ERROR_HANDLING": (lambda v: True, OK, "deprecated name",
                                          "use TORCH_NCCL_ASYNC_ERROR_HANDLING (kept in the image for old torch)"),
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": (lambda v: v == "0", WARN, "a failed or hung collective will hang the "
                                                "job instead of failing it", "set TORCH_NCCL_ASYNC_ERROR_HANDLING=1 so "
                                                "torchrun can restart from the last checkpoint"),
            "TORCH_NCCL_BLOCKING_WAIT": (lambda v: v == "1", WARN, "blocking waits cost throughput",
                                         "unset it; TORCH_NCCL_ASYNC_ERROR_HANDLING=1 gives timeouts without it"),
            "CUDA_DEVICE_MAX_CONNECTIONS": (lambda v: v == "1", WARN, "one hardware queue: FSDP all-gathers can queue "
                                            "behind compute kernels instead of overlapping them",
                                            "unset it (=1 is a Megatron tensor-parallel setting, not for FSDP)"),
            "NCCL_NVLS_ENABLE": (lambda v: v == "0", OK, "NVLink SHARP (multicast) off",
                                 "fine where multicast is unsupported (VMs, shared hosts); costs some all-reduce "
                                 "bandwidth on NVSwitch systems"),
        }
        for key, (cond, level, why, todo) in advice.items():
            v = env.get(key)
            if v is not None and cond(v):
                self.add(level, "env", f"{key}={v}: {why}", todo)
        cores = self.findings_data("cpus").get("cores", os.cpu_count() or 1)
        if "OMP_NUM_THREADS" not in env and self.n_gpus > 1:
            self.add(OK, "env", "OMP_NUM_THREADS unset (torchrun then sets 1 per rank)",
                     f"set OMP_NUM_THREADS={max(1, cores // self.n_gpus)} (cores ÷ GPUs) for CPU-side work")
        if self.d["nnodes"] > 1 and "NCCL_SOCKET_IFNAME" not in env:
            self.add(OK, "env", "NCCL_SOCKET_IFNAME unset on a multi-node job",
                     "if NCCL bootstrap picks the wrong interface (docker0, lo), set NCCL_SOCKET_IFNAME=^lo,docker0 "
                     "or the cluster NIC name")
        if self.n_gpus and "PYTORCH_CUDA_ALLOC_CONF" not in env:
            self.add(OK, "env", "PYTORCH_CUDA_ALLOC_CONF unset",
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces fragmentation OOMs with FSDP")

    def findings_data(self, check: str) -> dict:
        for f in self.findings:
            if f.check == check:
                return f.data
        return {}

    # bandwidth
    def report_bandwidth(self, res: dict, scope: str, nnodes: int) -> None:
        exp = expected_busbw(self.topo, self.pcie_gen, nnodes, self.ib_gbs)
        n = res["n"]
        if not res.get("correct", True):
            self.add(FAIL, "bandwidth", f"{scope}: all-reduce across {n} GPUs returned wrong sums",
                     "GPU peer-to-peer is corrupting data (often PCIe ACS/IOMMU in VMs): confirm with "
                     "NCCL_P2P_DISABLE=1, then fix ACS/IOMMU on the host", **res)
            return
        what = (f"{scope}, {n} GPUs, {res['bytes'] / GiB:.2f} GiB: all-reduce busbw {res['allreduce_busbw']:.0f} GB/s "
                f"(algbw {res['allreduce_algbw']:.0f}), all-gather busbw {res['allgather_busbw']:.0f} GB/s "
                f"(algbw {res['allgather_algbw']:.0f})")
        if exp is None:
            self.add(OK, "bandwidth", what + "; no expected figure (topology unknown)",
                     "compare with nccl-tests on this host", **res)
            return
        ratio = min(res["allreduce_busbw"], res["allgather_busbw"]) / exp[0]
        what += f"; expected ~{exp[0]:.0f} GB/s for {exp[1]}"
        res = dict(res, expected_busbw=round(exp[0], 1))
        if ratio < 0.5:
            self.add(WARN, "bandwidth", what + f" ({ratio:.0%} of it)",
                     "run with NCCL_DEBUG=INFO to see the transport (P2P/NVLS/IB vs SHM/Socket); check "
                     "NCCL_P2P_DISABLE/NCCL_IB_DISABLE, nvidia-fabricmanager, ACS/IOMMU, and that no other job "
                     "shares these GPUs or links", **res)
        else:
            self.add(OK, "bandwidth", what + f" ({ratio:.0%} of it)", **res)


# -------------------------------------------------------------------------------------------- bandwidth test


def bench_collectives(group, device, nbytes: int, iters: int = 20, warmup: int = 5) -> dict:
    """All-reduce and all-gather bus bandwidth over `group` on CUDA `device` (nccl-tests conventions)."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    numel = max(n, nbytes // 4 // n * n)
    x = torch.full((numel,), float(rank + 1), dtype=torch.float32, device=device)
    dist.all_reduce(x, group=group)
    torch.cuda.synchronize(device)
    correct = bool(torch.all(x[:: max(1, numel // 4096)] == n * (n + 1) / 2).item())
    out = torch.empty(numel, dtype=torch.float32, device=device)
    shard = torch.ones(numel // n, dtype=torch.float32, device=device)

    def timed(fn) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        dist.barrier(group=group, device_ids=[device.index])
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
        t = torch.tensor([(time.perf_counter() - t0) / iters], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t.item()

    x.fill_(0.0)
    t_ar = timed(lambda: dist.all_reduce(x, group=group))
    t_ag = timed(lambda: dist.all_gather_into_tensor(out, shard, group=group))
    size = numel * 4
    ar, ag = size / t_ar / 1e9, size / t_ag / 1e9
    return dict(n=n, bytes=size, correct=correct, allreduce_s=t_ar, allgather_s=t_ag,
                allreduce_algbw=round(ar, 1), allreduce_busbw=round(ar * 2 * (n - 1) / n, 1),
                allgather_algbw=round(ag, 1), allgather_busbw=round(ag * (n - 1) / n, 1))


def _local_worker(rank: int, n: int, port: int, nbytes: int, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=n, device_id=device,
                            timeout=datetime.timedelta(seconds=120))
    try:
        res = bench_collectives(None, device, nbytes)
        if rank == 0:
            queue.put(res)
    finally:
        dist.destroy_process_group()


def local_bandwidth(n: int, nbytes: int, timeout_s: float = 240) -> dict:
    """Spawn one process per local GPU and measure; {"error": ...} on failure or hang."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.spawn(_local_worker, args=(n, port, nbytes, queue), nprocs=n, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                return {"error": f"no result after {timeout_s:.0f} s (hang)"}
    except Exception as e:  # ProcessRaisedException / ProcessExitedException
        return {"error": str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)}
    return queue.get() if not queue.empty() else {"error": "workers exited without a result"}


# ----------------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxtrain doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="skip the bus-bandwidth test")
    p.add_argument("--checkpoint-dir", default=os.environ.get("FLUXTRAIN_CHECKPOINT_DIR", "runs"),
                   help="where checkpoints go; its write speed is measured (default $FLUXTRAIN_CHECKPOINT_DIR or runs)")
    p.add_argument("--write-mib", type=float, default=256, help="MiB written + fsynced to --checkpoint-dir (256)")
    p.add_argument("--bw-mib", type=float, default=1024, help="buffer size of the bandwidth test in MiB (1024)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return p


def _bandwidth(doc: Doctor) -> None:
    import torch

    if doc.n_gpus == 0:
        doc.add(WARN, "bandwidth", "no GPU: bus-bandwidth test skipped", "run `fluxtrain doctor` on a GPU node")
        return
    nbytes = int(doc.args.bw_mib * MiB)
    d = doc.d
    if d["world"] > 1:
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device())
        res = bench_collectives(None, device, nbytes)
        if d["rank"] == 0:
            doc.report_bandwidth(res, f"all ranks ({d['nnodes']} node(s))", d["nnodes"])
        if d["nnodes"] > 1 and d["local_world"] > 1 and d["world"] % d["local_world"] == 0:
            sub, _ = dist.new_subgroups(group_size=d["local_world"])
            res = bench_collectives(sub, device, nbytes)
            if d["rank"] == 0:
                doc.report_bandwidth(res, "within node 0", 1)
        return
    if doc.n_gpus == 1:
        doc.add(OK, "bandwidth", "1 GPU: no collective to measure")
        return
    res = local_bandwidth(doc.n_gpus, nbytes)
    if "error" in res:
        doc.add(FAIL, "bandwidth", f"NCCL test across {doc.n_gpus} local GPUs failed: {res['error']}",
                "rerun with NCCL_DEBUG=INFO; a hang often means broken P2P (try NCCL_P2P_DISABLE=1 to confirm, then "
                "fix ACS/IOMMU), an error often a driver/NCCL mismatch or too small /dev/shm")
    else:
        doc.report_bandwidth(res, "local GPUs", 1)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    doc = Doctor(args)
    d = doc.d
    dist_up = False
    if d["world"] > 1:
        import torch
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(d["local_rank"] % torch.cuda.device_count())
        dist.init_process_group("nccl" if cuda else "gloo", rank=d["rank"], world_size=d["world"],
                                timeout=datetime.timedelta(seconds=300),
                                device_id=torch.device("cuda", torch.cuda.current_device()) if cuda else None)
        dist_up = True
    try:
        if d["local_rank"] == 0:  # one set of node checks per node (one disk writer per node)
            doc.run_local()
        else:
            import torch
            doc.n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not args.quick:
            try:
                _bandwidth(doc)
            except Exception as e:
                doc.add(FAIL, "bandwidth", f"bandwidth test crashed: {e}", "rerun with NCCL_DEBUG=INFO and read the "
                        "first NCCL WARN line; check that every rank sees its GPU")
        findings = doc.findings
        if dist_up:
            import torch.distributed as dist

            gathered: list = [None] * d["world"] if d["rank"] == 0 else None
            dist.gather_object((socket.gethostname(), d["local_rank"], [asdict(f) for f in findings]), gathered, dst=0)
            if d["rank"] == 0:
                findings = _merge(gathered)
            failed = [int(any(f.level == FAIL for f in findings))] if d["rank"] == 0 else [0]
            dist.broadcast_object_list(failed, src=0)
            if d["rank"] != 0:
                return 1 if failed[0] else 0
    finally:
        if dist_up:
            import torch.distributed as dist

            dist.destroy_process_group()
    _print(findings, args.json, d)
    return 1 if any(f.level == FAIL for f in findings) else 0


def _merge(gathered: list) -> list[Finding]:
    """Rank 0's findings, plus what other nodes report differently (WARN/FAIL only), prefixed by host name."""
    _, _, own = gathered[0]
    out = [Finding(**f) for f in own]
    seen = {(f["level"], f["what"]) for f in own}
    for host, local_rank, fs in gathered[1:]:
        if local_rank != 0:  # only local rank 0 ran the node checks
            continue
        for f in fs:
            if f["level"] != OK and (f["level"], f["what"]) not in seen:
                seen.add((f["level"], f["what"]))
                out.append(Finding(f["level"], f["check"], f"{host}: {f['what']}", f["todo"], f["data"]))
    return out


def _print(findings: list[Finding], as_json: bool, d: dict) -> None:
    counts = {lvl: sum(f.level == lvl for f in findings) for lvl in (OK, WARN, FAIL)}
    if as_json:
        versions = next((f.data for f in findings if f.check == "versions"), {})
        disk = next((f.data for f in findings if f.check == "checkpoint-dir"), {})
        print(json.dumps({"ok": counts[FAIL] == 0, "counts": counts, "torch": versions.get("torch"),
                          "versions": versions, "write_mib_s": disk.get("write_mib_s"), "world": d,
                          "findings": [asdict(f) for f in findings]}, indent=1, default=str))
        return
    for f in findings:
        print(f.line())
    print(f"doctor: {counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL")


if __name__ == "__main__":
    raise SystemExit(main())
