"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic publish, retention, resume, async save.

Layout of `checkpoints/step-00000010/`: DCP files (model + optimizer + LR scheduler, resharded on load), and per rank
`rank-N.json` (step, data position, counters) and `rng-N.safetensors` (torch CPU/CUDA, numpy, python RNG states) —
plain data, nothing unpickled. A checkpoint is written under `.tmp-step-…` and renamed when every rank is done, so
a crash mid-save never leaves a checkpoint that `resume = auto` would pick.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from fluxtrain.config import CheckpointConfig

DONE = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / DONE).is_file())


def find_resume(run_dir: Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(run_dir / "checkpoints")
        return done[-1] if done else None
    p = Path(resume)
    if not (p / DONE).is_file():
        raise CheckpointError(f"checkpoint.resume = {resume}: not a complete checkpoint (no {DONE} marker); "
                              "give a checkpoints/step-XXXXXXXX folder or 'auto'")
    return p


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    st = {"torch": torch.get_rng_state(),
          "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
          "python": torch.from_numpy(np.frombuffer(json.dumps(_py_state()).encode(), dtype=np.uint8).copy())}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _np_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _py_state():
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


def _set_rng_state(st: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = json.loads(bytes(st["numpy"].numpy()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    v, state, gauss = json.loads(bytes(st["python"].numpy()).decode())
    random.setstate((v, tuple(state), gauss))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, rank: int, world_size: int, device: torch.device,
                 log=None, extras: dict | None = None, trainable_only: bool = False, ema=None):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world, self.device = cfg, rank, world_size, device
        self.log = log
        # LoRA: frozen base weights are not saved (the checkpoint references the base through config.toml)
        self.model_options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        self.ema = ema
        self.extras = extras or {}  # name → (module, optimizer) saved beside the model (e.g. the ITC head)
        self.pending = None  # (future, tmp, final) of an async save in flight
        # async saves finish their collectives in a background thread: on a group of their own, so they never
        # interleave with the training step's collectives on the default group (that deadlocks gloo)
        self.group = dist.new_group(backend="gloo") if cfg.async_save else None

    # ---- save -----------------------------------------------------------------------------------------------
    def _app_state(self, model, opt, sched) -> dict:
        state = {"model": get_model_state_dict(model, options=self.model_options)}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if opt is not None:
            state["optim"] = get_optimizer_state_dict(model, opt)
        if sched is not None:
            state["sched"] = {"last_epoch": torch.tensor(sched.last_epoch)}
        for name, (mod, mopt) in self.extras.items():
            state[f"{name}_model"] = get_model_state_dict(mod)
            state[f"{name}_optim"] = get_optimizer_state_dict(mod, mopt)
        return state

    def save(self, step: int, model, opt, sched, extra: dict, async_ok: bool = True) -> float:
        """Save; returns the seconds training was stalled. The previous async save is finished first."""
        t0 = time.perf_counter()
        self.wait()
        final = step_dir(self.root, step)
        tmp = self.root / f".tmp-step-{step:08d}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        try:
            (tmp / f"rank-{self.rank}.json").write_text(json.dumps({"step": step, "world_size": self.world, **extra}))
            from safetensors.torch import save_file

            save_file(_rng_state(self.device), str(tmp / f"rng-{self.rank}.safetensors"))
            state = self._app_state(model, opt, sched)
            if async_ok and self.cfg.async_save:
                fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
                self.pending = (fut, tmp, final, step)
            else:
                dcp.save(state, checkpoint_id=str(tmp))
                self._publish(tmp, final, step)
        except OSError as err:
            raise CheckpointError(f"rank {self.rank}: cannot write checkpoint to {tmp}: {err.strerror or err}; "
                                  f"free space or fix permissions — the last complete checkpoint is kept") from err
        return time.perf_counter() - t0

    def wait(self) -> None:
        if self.pending is None:
            return
        fut, tmp, final, step = self.pending
        self.pending = None
        fut.result()
        self._publish(tmp, final, step)

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        dist.barrier()  # every rank's files are written
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            (final / DONE).write_text(str(step))
            self._retain()
        dist.barrier()

    def _retain(self) -> None:
        done = complete_checkpoints(self.root)
        keep = set(done[-self.cfg.keep:]) if self.cfg.keep > 0 else set(done)
        for p in done:
            step = int(p.name.split("-")[1])
            if p not in keep and not (self.cfg.keep_every and step % self.cfg.keep_every == 0):
                shutil.rmtree(p, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------------------------
    def load(self, path: Path, model, opt, sched) -> dict:
        """Load into the (sharded) model/optimizer; returns this rank's extra state (resharded runs get rank 0's
        counters and a note)."""
        state = self._app_state(model, opt, sched)
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException; it names the key
            msg = [m.strip() for m in str(err).strip().splitlines()]
            first = next((m for m in reversed(msg) if m.startswith(("RuntimeError:", "ValueError:", "KeyError:"))
                          or "Missing key" in m or "ize mismatch" in m), msg[-1] if msg else repr(err))
            first = first.split(": ", 1)[1] if first.startswith(("RuntimeError:", "ValueError:", "KeyError:")) else first
            raise CheckpointError(f"{path} does not fit this model/config: {first[:300]}") from None
        set_model_state_dict(model, state["model"], options=self.model_options)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if opt is not None:
            set_optimizer_state_dict(model, opt, state["optim"])
        for name, (mod, mopt) in self.extras.items():
            set_model_state_dict(mod, state[f"{name}_model"])
            set_optimizer_state_dict(mod, mopt, state[f"{name}_optim"])
        if sched is not None:
            sched.last_epoch = int(state["sched"]["last_epoch"])
            sched._last_lr = [g["lr"] for g in opt.param_groups]
        own = path / f"rank-{self.rank}.json"
        extra = json.loads((own if own.is_file() else path / "rank-0.json").read_text())
        if extra.get("world_size") == self.world:
            from safetensors.torch import load_file

            _set_rng_state(load_file(str(path / f"rng-{self.rank}.safetensors")), self.device)
            extra["resharded"] = False
        else:
            extra["resharded"] = True
        return extra

