"""Process group and device mesh from torchrun / accelerate / Slurm environment variables.

Every run has a process group, a one-rank gloo group for a plain `fluxtrain train`, so that one code path (DCP
checkpoints, collectives) serves one process and many. (One fp32 process trains its model unsharded: FSDP2 would
only add overhead there; see `parallel.wants_fsdp`.)
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fluxtrain.config import Config, ConfigError, validate_world


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    mesh: DeviceMesh
    owns_group: bool = True  # False when the caller started the process group (tests, notebooks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, int]:
    """RANK/WORLD_SIZE/LOCAL_RANK from torchrun or accelerate, else from Slurm (srun without torchrun), else 1 rank.

    Sets MASTER_ADDR/MASTER_PORT where Slurm or a single process needs them."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_var("RANK"), _int_var("WORLD_SIZE")
        local = _int_var("LOCAL_RANK", rank)
        local_world = _int_var("LOCAL_WORLD_SIZE", world)
    elif "RANK" in env or "WORLD_SIZE" in env:  # RANK=1 alone trained as a lone rank 0
        raise ConfigError("RANK and WORLD_SIZE go together (one is set): launch with torchrun, or unset it")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_var("SLURM_PROCID"), _int_var("SLURM_NTASKS")
        local = _int_var("SLURM_LOCALID", 0)
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0].split(",")[0] or world)
        if world > 1 and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:  # salloc or sbatch, not srun
            raise ConfigError(f"SLURM_NTASKS = {world} but this process was not started by srun (it would wait for "
                              "its peers forever): run it under srun, or under torchrun")
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if world > 1 and not nodes:
                raise ConfigError("Slurm launch without MASTER_ADDR or SLURM_NODELIST: export MASTER_ADDR=<first node>")
            env["MASTER_ADDR"] = _first_slurm_host(nodes) if world > 1 else "127.0.0.1"
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    else:
        rank, world, local, local_world = 0, 1, 0, 1
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    if not (world >= 1 and 0 <= rank < world and 0 <= local < max(local_world, 1)):
        raise ConfigError(f"launch environment: rank {rank}, local rank {local} of world {world} (local {local_world}) "
                          "cannot be: check RANK, WORLD_SIZE and LOCAL_RANK (or the Slurm task variables)")
    if world > 1:
        _check_master()
    return dict(rank=rank, world_size=world, local_rank=local, local_world_size=local_world)


def _int_var(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} = '{text}' is not a whole number: fix the launch environment") from None


def _check_master() -> None:
    """Where the ranks meet: an unresolvable MASTER_ADDR retried its lookup forever, in silence."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return  # torchrun's agent holds the store and has already met its peers
    if not addr:
        raise ConfigError("MASTER_ADDR is not set: launch with torchrun, or export MASTER_ADDR and MASTER_PORT")
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"MASTER_PORT = '{port}' is not a port number (1–65535)")
    try:
        socket.getaddrinfo(addr, int(port))
    except OSError as err:
        raise ConfigError(f"MASTER_ADDR = '{addr}' does not resolve ({err.strerror or err}): give the first node's "
                          "host name or address") from None


def _first_slurm_host(nodelist: str) -> str:
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    # "node[01-04],gpu7" → "node01" without scontrol
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.rstrip("]").split(",")[0].split("-")[0]
    return head


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device = cuda but no GPU is visible: set train.device = cpu or check CUDA_VISIBLE_DEVICES")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(cfg: Config) -> Dist:
    """Start the process group and build the mesh. Config checks that need the world size run first."""
    e = launch_env()
    validate_world(cfg, e["world_size"], e["local_world_size"])
    device = pick_device(cfg, e["local_rank"])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the one place a device is assigned; the model follows the mesh from here
    # gloo beside nccl: CPU offload and DCP's async save move CPU tensors through the group
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, rank=e["rank"], world_size=e["world_size"], store=_attempt_store(e),
                                timeout=datetime.timedelta(seconds=cfg.parallel.nccl_timeout_s),
                                device_id=device if device.type == "cuda" else None)
    mesh = build_mesh(cfg, device.type, e["world_size"], e["local_world_size"])
    return Dist(device=device, mesh=mesh, owns_group=owns, **e)


def _attempt_store(e: dict):
    """Under torchrun restarts (--max-restarts) the rendezvous store outlives the failed attempt and still holds its
    workers' addresses; a prefix per attempt keeps the new group from dialling dead peers."""
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if not count or count == "0":
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), e["world_size"],
                          is_master=not agent and e["rank"] == 0, timeout=datetime.timedelta(seconds=300),
                          wait_for_workers=False)
    return dist.PrefixStore(f"fluxtrain/attempt-{count}", store)


def build_mesh(cfg: Config, device_type: str, world: int, local_world: int) -> DeviceMesh:
    if cfg.parallel.strategy == "HYBRID_SHARD":
        shard = cfg.parallel.shard_size or local_world
        return init_device_mesh(device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))


class PeerFailed(RuntimeError):
    """This rank's collective broke because another rank exited: that rank's error is the one to read (torchrun
    reports the first failure), so the CLI prints none for this one."""


def peer_gone(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, dist.DistBackendError) or "closed by peer" in text or "reset by peer" in text


def teardown(owns_group: bool = True, wait_for_peers: bool = True) -> None:
    if dist.is_initialized() and owns_group:
        if wait_for_peers:
            try:
                dist.barrier()
            except Exception:  # a peer already failed: don't hang on it
                pass
        dist.destroy_process_group()
