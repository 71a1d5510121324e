"""Shared test helpers: real multi-process launches (torchrun over gloo) of the tiny default, and run-dir readers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Small and fast: 2 samples per rank, 10 steps, sampling grid of one prompt with 2 Euler steps, fp32 for exactness.
FAST = ["--train.steps", "10", "--train.batch_size", "2", "--parallel.mixed_precision", "fp32",
        "--eval.prompts", '["a red circle"]', "--eval.num_inference_steps", "2", "--log.interval", "1",
        "--checkpoint.interval", "1000", "--checkpoint.async_save", "false", "--log.progress", "none",
        "--optim.warmup_steps", "0", "--log.trackers", '["jsonl"]']

# parametrize over devices: the CPU always, a GPU where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                    "TORCHELASTIC", "SLURM_"))}
    # the repo first, then whatever the caller had (a GPU image's extra site folder)
    path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path), **extra)
    return e


def torchrun(nproc: int, args: list[str], timeout: int = 600, extra_env: dict | None = None,
             torchrun_args: list[str] | None = None) -> subprocess.CompletedProcess:
    extra = list(torchrun_args or [])
    where = [] if any(a.startswith("--rdzv") for a in extra) else ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *where, *extra, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)


def run_variants(nproc: int, out: Path, variants: dict[str, list[str]], base: list[str] | None = None,
                 timeout: int = 900) -> None:
    """Train each variant of the tiny default under one torchrun launch; raises with the log tail on failure."""
    spec = out / "variants.json"
    out.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(variants))
    res = torchrun(nproc, [str(ROOT / "tests" / "parallel" / "run_variants.py"), str(out), str(spec)],
                   timeout=timeout, extra_env={"FLUXTRAIN_TEST_BASE": json.dumps(FAST + (base or []))})
    (out / "torchrun.stderr").write_text(res.stderr)  # for tests of what the launch printed
    if res.returncode != 0:
        raise AssertionError(f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")


def fluxtrain(args: list[str], timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxtrain", *args], cwd=ROOT, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "event" not in r}


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in metrics(run_dir) if r.get("event") == name]


def assert_close(a: dict[int, float], b: dict[int, float], rel: float, what: str = "") -> None:
    assert a.keys() == b.keys() and len(a) >= 10, (what, sorted(a), sorted(b))
    for k in a:
        assert abs(a[k] - b[k]) <= rel * abs(b[k]), f"{what} step {k}: {a[k]} vs {b[k]}"


def load_bench(name: str):
    """A bench/ script as a module (bench is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
