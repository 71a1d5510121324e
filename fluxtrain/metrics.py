"""Honest throughput: analytic FLUX FLOPs, MFU against the datasheet peak, memory, and the metric writers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets; CPU has none.
PEAK_TFLOPS = {"H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0}


def flux_flops_per_sample(kw: dict, img_tokens: int, txt_tokens: int, training: bool = True) -> float:
    """FLOPs of one sample through FluxTransformer2DModel (matmuls + joint attention; recompute not counted).

    Double block, per token: q,k,v, out (4d²) and MLP d→4d→d (8d²) in its own stream → 2·12d².
    Single block, per token: linear1 d→3d+4d and linear2 5d→d → 2·12d². Attention: 4·S²·d per layer.
    Embedders and the output projection add per-token matmuls; modulation is per sample. Training = 3× forward.
    """
    d = kw["num_attention_heads"] * kw["attention_head_dim"]
    s = img_tokens + txt_tokens
    layers = kw["num_layers"] + kw["num_single_layers"]
    mlp = 4
    per_layer = 2 * (4 + 2 * mlp) * d * d * s + 4 * s * s * d
    io = 2 * kw["in_channels"] * d * img_tokens + 2 * kw["joint_attention_dim"] * d * txt_tokens
    io += 2 * d * kw["in_channels"] * img_tokens  # proj_out (patch_size 1: out = in channels)
    # per-sample modulation linears: 12d² per double block (two streams × 6d), 3d² per single block, 2d² final
    mod = 2 * d * d * (12 * kw["num_layers"] + 3 * kw["num_single_layers"] + 2)
    fwd = layers * per_layer + io + mod
    return float(fwd * (3 if training else 1))


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return val
    return None


def memory_stats(device: torch.device) -> dict:
    import psutil

    out = {"host_rss_gib": psutil.Process().memory_info().rss / 2**30,
           "mem_gib": None, "mem_peak_gib": None, "mem_reserved_gib": None}
    if device.type == "cuda":
        out.update(mem_gib=torch.cuda.memory_allocated(device) / 2**30,
                   mem_peak_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                   mem_reserved_gib=torch.cuda.memory_reserved(device) / 2**30)
    return out


class MetricsWriter:
    """metrics.jsonl always; TensorBoard / W&B on rank 0 as configured. Non-main ranks write nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool, trackers: list[str], config: dict | None = None,
                 wandb_project: str = "fluxtrain", append: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.file = open(self.path, "a" if append else "w", buffering=1)
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        if "wandb" in trackers:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("log.trackers has 'wandb' but wandb is not installed: pip install 'fluxtrain[wandb]'") from None
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config,
                                    name=Path(run_dir).name, resume="allow")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.tb:
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def event(self, step: int, event: str, **fields) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), "event": event, **fields}) + "\n")
        if self.tb:
            for k, v in fields.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{event}/{k}", v, step)

    def image(self, step: int, tag: str, png_path: str | Path) -> None:
        if not self.enabled:
            return
        import numpy as np
        from PIL import Image

        if self.tb:
            self.tb.add_image(tag, np.asarray(Image.open(png_path).convert("RGB")), step, dataformats="HWC")
        if self.wandb:
            import wandb

            self.wandb.log({tag: wandb.Image(str(png_path))}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class Throughput:
    """Samples/s, tokens/s, TFLOP/s per GPU and MFU over the steps since the last report."""

    def __init__(self, flops_per_sample: float, tokens_per_sample: int, world_size: int, device: torch.device):
        self.fps, self.tps, self.world = flops_per_sample, tokens_per_sample, world_size
        self.peak = peak_tflops(device)
        self.reset()

    def reset(self) -> None:
        self.t0, self.samples, self.data_wait = time.perf_counter(), 0, 0.0

    def add(self, global_samples: int, data_wait_s: float) -> None:
        self.samples += global_samples
        self.data_wait += data_wait_s

    def report(self, steps: int) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        sps = self.samples / dt
        tflops = sps * self.fps / self.world / 1e12
        out = {"samples_per_s": sps, "tokens_per_s": sps * self.tps, "tflops_per_gpu": tflops,
               "mfu": (tflops / self.peak) if self.peak else None, "step_time_s": dt / max(steps, 1),
               "data_wait_s": self.data_wait / max(steps, 1)}
        self.reset()
        return out


def rank_log_path(run_dir: str | Path, rank: int) -> Path:
    p = Path(run_dir) / "logs"
    p.mkdir(parents=True, exist_ok=True)
    return p / f"rank-{rank}.log"


def setup_logging(run_dir: str | Path, rank: int):
    """Every rank logs to logs/rank-N.log; rank 0 also to the console. Lines name the rank."""
    import logging

    log = logging.getLogger("fluxtrain")
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(rank_log_path(run_dir, rank))
    fh.setFormatter(fmt)
    log.addHandler(fh)
    if rank == 0 or os.environ.get("FLUXTRAIN_LOG_ALL_RANKS"):
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        log.addHandler(sh)
    return log
