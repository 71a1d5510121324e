"""Sharded checkpoints with torch.distributed.checkpoint (DCP): publish, retention, resume, async save.

Layout of `checkpoints/step-00000010/`: DCP files (model + optimizer + LR scheduler, resharded on load), per rank
`rank-N.json` (step, data position, counters) and `rng-N.safetensors` (torch CPU/CUDA, numpy, python RNG states) —
plain data, nothing unpickled — and the run's `config.toml`. `checkpoint.dir` is a local folder or an fsspec URL
(`s3://bucket/run/checkpoints`); every rank writes its own files. A checkpoint counts once rank 0 has written its
`COMPLETE` marker, after every rank is done: a local checkpoint is first written under `.tmp-step-…` and renamed;
object stores have no rename, so there it is written in place and the marker, written last, publishes it. Either way
a crash mid-save never leaves a checkpoint that `resume = auto` would pick.

An async save copies the state off the device ("staging"), then writes it on a thread. With background staging
(`checkpoint.staging`, on by default on CUDA) the copy into pinned host memory runs on a thread too, overlapping the
next step's forward/backward: `staged()` must be called before the optimizer changes the weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import posixpath
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from fluxtrain import digests
from fluxtrain.config import CheckpointConfig
from fluxtrain.optim import flush
from fluxtrain.pinned import pinned_zeros

DONE = "COMPLETE"


class CheckpointError(RuntimeError):
    """`agreed`: every rank raised this same error (a collective decided it), so the CLI prints rank 0's line only."""

    def __init__(self, msg: str, agreed: bool = False):
        super().__init__(msg)
        self.agreed = agreed


class DamagedCheckpoint(CheckpointError):
    """A file that does not match its digest: `what` names it, for `fluxtrain verify`'s own line."""

    def __init__(self, path, what: str, agreed: bool = False):
        super().__init__(f"{path} is damaged: {what}: {EARLIER}", agreed)
        self.what = what


def is_url(loc) -> bool:
    return "://" in str(loc)


def _fs(loc):
    """(fsspec filesystem, path without protocol) of a local path or URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(loc))


# The globals DCP's `.metadata` pickle names, recorded from the trainer's own checkpoints (FSDP, HSDP, DDP, LoRA, EMA,
# ITC head, sync/async/background-staged saves, local and S3; torch 2.13): its metadata dataclasses, its files'
# storage info, sizes, dtypes (any, below) and layouts, and the path it was saved to. Nothing else is unpickled.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata",
                                              "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # a torch.layout pickles as _get_layout("torch.strided")
    "pathlib": {"PosixPath", "WindowsPath"},  # StorageMeta.checkpoint_id of a save given a Path
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # vars(), not getattr: torch's module __getattr__ would import whatever a name asks for
        if name in _METADATA_GLOBALS.get(module, ()) or (module == "torch" and isinstance(vars(torch).get(name),
                                                                                           torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"refuses to unpickle '{module}.{name}' (not checkpoint metadata)")


def _load_metadata(fs, path) -> Metadata:
    """DCP's `.metadata` at `path`, unpickled with the allowlist above: a pickle runs whatever it names."""
    with fs.create_stream(path, "rb") as f:
        try:
            md = _MetadataUnpickler(f).load()
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}; this checkpoint was not written by fluxtrain/DCP or was tampered "
                                  "with") from None
        except Exception as err:  # truncated or not a pickle: any of a dozen exception types
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({_reason(err)}); the checkpoint is "
                                  "damaged (an interrupted copy?): copy it again or use another one") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not checkpoint metadata; this checkpoint was not "
                              "written by fluxtrain/DCP or was tampered with")
    return md


class _SafeMetadata:
    """DCP's reader with `read_metadata` unpickling through the allowlist; given a Metadata already read (`known`),
    it is used again instead of fetched again (an export loads block after block)."""

    known: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        if self.known is not None and rank is None:
            md = copy.copy(self.known)  # its own storage_meta: readers on other threads share the rest, read-only
            md.storage_meta = copy.copy(md.storage_meta)
        else:
            md = _load_metadata(self.fs, self._get_metadata_path(rank))
        # as FileSystemReader.read_metadata goes on after its pickle.load
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _FileSystemReader(_SafeMetadata, FileSystemReader):
    pass


class _FsspecReader(_SafeMetadata, FsspecReader):
    pass


def storage_reader(loc, known: Metadata | None = None) -> FileSystemReader:
    """DCP's reader for a checkpoint in a local folder or at an fsspec URL (s3://…), its metadata unpickled safely;
    `known`: the checkpoint's metadata, read before (see read_metadata)."""
    reader = _FsspecReader(str(loc)) if is_url(loc) else _FileSystemReader(str(loc))
    reader.known = known
    return reader


def read_metadata(loc) -> Metadata:
    """A checkpoint's DCP metadata (what it holds, where), read before dcp.load: DCP takes any failure to read it for
    a missing file and goes on to a confusing error. Every failure is one CheckpointError line."""
    with _storage(f"cannot read the metadata of {loc}", loc, "" if is_url(loc) else
                  "is it a complete checkpoints/step-XXXXXXXX folder?"):
        return storage_reader(loc).read_metadata()


def location(loc: str | Path) -> str | Path:
    """A local folder as a Path, a URL as a string (Path would fold `s3://` into `s3:/`)."""
    return str(loc).rstrip("/") if is_url(loc) else Path(loc)


def checkpoint_root(run_dir: str | Path, ckpt_dir: str = "") -> Path | str:
    """Where a run's checkpoints live: `checkpoint.dir` (a local folder or URL), else <output_dir>/checkpoints."""
    return location(ckpt_dir) if ckpt_dir else Path(run_dir) / "checkpoints"


def _reason(err: BaseException) -> str:
    """What went wrong, in one line; DCP's CheckpointException is unwrapped to the first failing rank's error."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (exc, _) = next(iter(err.failures.items()))
        return f"rank {rank}: {_reason(exc)}"
    lines = str(err).strip().splitlines()
    return (f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__)[:300]


EARLIER = "use an earlier step-N folder (a resume: --checkpoint.resume PATH), or move this one aside"
DAMAGED = f"its files are damaged or missing: {EARLIER}"


def load_failure(path, err: BaseException) -> CheckpointError:
    """A failed DCP load as one line: a model/config that does not fit (DCP names the key or the sizes), or files
    that can't be read (truncated, overwritten, deleted: EOFError, an unpickling error, FileNotFoundError)."""
    msg = [m.strip() for m in str(err).strip().splitlines()]
    agreed = isinstance(err, CheckpointException)  # DCP gathers the failures: every rank has the same one
    fit = next((m for m in reversed(msg) if "Missing key" in m or "ize mismatch" in m), None)
    if fit is not None:
        return CheckpointError(f"{path} does not fit this model/config: {fit.split(': ', 1)[-1][:300]}", agreed)
    return CheckpointError(f"{path} cannot be read ({_reason(err)}): {DAMAGED}", agreed)


@contextlib.contextmanager
def _storage(what: str, where, fix: str = ""):
    """Storage failures as one CheckpointError line: what failed, why, and what to do about it."""
    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
        fix = fix or ("check the URL, the credentials and endpoint (AWS_* variables for s3://)" if is_url(where)
                      else "free space or fix permissions")
        raise CheckpointError(f"{what}: {_reason(err)}; {fix}") from err


def _complete(fs, path: str) -> list[str]:
    fs.invalidate_cache()  # other ranks and runs write here: any cached listing may be stale
    if not fs.exists(path):
        return []
    # ls, not glob: a folder name with [ or * in it stays a name
    return sorted(p for p in fs.ls(path, detail=False)
                  if posixpath.basename(p).startswith("step-") and fs.isfile(f"{p}/{DONE}"))


def complete_checkpoints(root: Path | str) -> list[Path | str]:
    """Published checkpoints under a local folder (as Paths) or URL (as URLs), oldest first."""
    fs, path = _fs(root)
    with _storage(f"cannot list checkpoints in {root}", root):
        done = _complete(fs, path)
    return [fs.unstrip_protocol(p) if is_url(root) else Path(p) for p in done]


def verify(path, rank: int = 0, world: int = 1) -> tuple[int, int] | None:
    """Check a local checkpoint's files against the SHA-256 digests written with them, the files spread over the
    ranks (collective when world > 1); (files, bytes) checked, None where it has no digests (an object store, an older
    checkpoint). A mismatch is a CheckpointError on every rank, naming the file."""
    fs, local = _fs(path)
    if not isinstance(fs, LocalFileSystem):
        return None
    folder = Path(local)
    entries = digests.listed(folder)
    if entries is None:
        return None
    bad = digests.first_bad(folder, entries, rank, world)
    if world > 1:  # every rank learns the first bad file, and raises the same error
        t = torch.tensor([len(entries) if bad is None else bad])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        bad = None if t.item() == len(entries) else int(t.item())
    if bad is not None:
        what = digests.problem(folder, entries[bad]) or "a file changed while checked"
        raise DamagedCheckpoint(path, what, agreed=world > 1)
    return len(entries), sum(size for _, size, _ in entries)


def set_aside_earlier(run_dir: str | Path, ckpt_dir: str = "", is_main: bool = True) -> tuple[int, Path] | None:
    """A fresh start (checkpoint.resume = never) where an earlier run left checkpoints: the main rank moves their
    folder to <folder>.earlier-<UTC time>, nothing deleted, and says how many went where. Left in place, the two
    runs' steps mix: retention keeps the highest steps (keep = 1 kept an earlier run's step 2000 and deleted this
    run's step 1000), and a later resume = auto takes the highest. A URL can't be renamed cheaply: an error."""
    root = checkpoint_root(run_dir, ckpt_dir)
    done = complete_checkpoints(root)
    if not done:
        return None
    if is_url(root):
        latest = posixpath.basename(str(done[-1]).rstrip("/"))
        raise CheckpointError(f"{root} holds {len(done)} checkpoints of an earlier run (latest {latest}); a fresh start "
                              "(checkpoint.resume = never) would mix this run's with them: set another checkpoint.dir, "
                              "delete them, or continue them with checkpoint.resume = auto")
    dest = root.with_name(f"{root.name}.earlier-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if is_main:
        root.rename(dest)
    return len(done), dest


def set_aside_later(run_dir: str | Path, ckpt_dir: str, step: int, is_main: bool = True) -> tuple[int, Path] | None:
    """A resume at `step` where this run's checkpoint folder holds later steps (a branch given up: the run went back
    to an earlier checkpoint): the main rank moves those to <folder>.after-step-N-<UTC time>, nothing deleted. Left in
    place, retention keeps the highest steps (it deleted the new branch's checkpoint as soon as it was written) and
    the next checkpoint.resume = auto continues the branch given up."""
    root = checkpoint_root(run_dir, ckpt_dir)
    later = [p for p in complete_checkpoints(root) if _step_of(p) > step]
    if not later:
        return None
    if is_url(root):
        raise CheckpointError(f"{root} holds {len(later)} checkpoints past step {step}, the one resumed from; this "
                              "run's would mix with them: move or delete them, or set another checkpoint.dir")
    dest = root.with_name(f"{root.name}.after-step-{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if is_main:
        dest.mkdir()
        for p in later:
            p.rename(dest / p.name)
    return len(later), dest


def _step_of(path) -> int:
    name = posixpath.basename(str(path).rstrip("/"))
    return int(name[5:]) if name[5:].isdigit() else -1


def find_resume(run_dir: str | Path, resume: str, ckpt_dir: str = "") -> Path | str | None:
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(checkpoint_root(run_dir, ckpt_dir))
        return done[-1] if done else None
    fs, path = _fs(resume)
    with _storage(f"checkpoint.resume = {resume}: cannot read it", resume):
        ok = fs.isfile(f"{path.rstrip('/')}/{DONE}")
    if not ok:
        raise CheckpointError(f"checkpoint.resume = {resume}: not a complete checkpoint (no {DONE} marker); "
                              "give a checkpoints/step-XXXXXXXX folder or 'auto'")
    return location(resume)


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


class PinnedStager:
    """DCP async stager: copies the state into host buffers that are kept from save to save, on a side stream, from a
    thread, so training goes on meanwhile. DCP's DefaultStager can't be reused in torch 2.11 (it forgets its copy
    tables after one stage), and allocating 24 GB of pinned memory per save costs ~10 s: so the buffers are ours.
    A save finishes (Checkpointer.wait) before the next one stages, so the buffers are never overwritten early."""

    _synchronize_after_execute = False

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-stage")
        self.buffers: dict[str, torch.Tensor] = {}

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self.pool.shutdown()

    def reserve(self, state_dict: dict) -> Future:
        """Allocate the buffers for states shaped like `state_dict` on the stager's thread, now: pinning tens of GB
        takes tens of seconds (47 s for 24 GB per rank at 12B), which the first save would otherwise stall on."""
        leaves: list[tuple[str, torch.Tensor]] = []
        self._leaves(state_dict, "", leaves)
        return self.pool.submit(self._allocate, leaves)

    def stage(self, state_dict: dict) -> Future:
        if self.cuda:  # the side stream must see the optimizer's last writes
            self.stream.wait_stream(torch.cuda.current_stream())
        return self.pool.submit(self._copy, state_dict)

    def _copy(self, state_dict: dict) -> dict:
        leaves: list[tuple[str, torch.Tensor]] = []
        self._leaves(state_dict, "", leaves)
        if any(k not in self.buffers or self.buffers[k].shape != t.shape or self.buffers[k].dtype != t.dtype
               for k, t in leaves):
            self._allocate(leaves)
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with ctx:
            out = self._tree(state_dict, "")
        if self.cuda:
            self.stream.synchronize()
        return out

    def _leaves(self, x, key: str, out: list) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                self._leaves(v, f"{key}/{k}", out)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                self._leaves(v, f"{key}/{i}", out)
        elif isinstance(x, torch.Tensor):
            out.append((key, x.to_local() if isinstance(x, DTensor) else x))

    def _allocate(self, leaves: list[tuple[str, torch.Tensor]]) -> None:
        """One pinned block carved into every tensor's buffer: torch's host allocator rounds each pinned allocation
        up to a power of two (up to twice the memory, and much slower to make per tensor); `pinned_zeros` does not."""
        offsets, total = [], 0
        for _, t in leaves:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // 64) * 64
        self.buffers = {}
        flat = pinned_zeros(total, torch.uint8, self.cuda)
        for (key, t), off in zip(leaves, offsets):
            self.buffers[key] = flat[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)

    def _tree(self, x, key: str):
        if isinstance(x, dict):
            return {k: self._tree(v, f"{key}/{k}") for k, v in x.items()}
        if isinstance(x, list):
            return [self._tree(v, f"{key}/{i}") for i, v in enumerate(x)]
        if isinstance(x, DTensor):
            local = self._host(x.to_local(), key)
            return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False, shape=x.shape,
                                      stride=x.stride())
        if isinstance(x, torch.Tensor):
            return self._host(x, key)
        return x  # plain values (param_groups' lr, …) are taken as they are now

    def _host(self, t: torch.Tensor, key: str) -> torch.Tensor:
        buf = self.buffers[key]
        buf.copy_(t.detach(), non_blocking=self.cuda)
        return buf


@dataclass
class _Save:
    """An async save in flight."""
    step: int
    target: str  # where DCP writes, without protocol (a local checkpoint's .tmp folder)
    where: str  # the same as DCP and the user see it (a URL for object stores)
    upload: Future
    staging: Future | None = None  # background staging: done once the state has been copied off the device
    stall: float = 0.0  # seconds training waited for this save so far


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, rank: int, world_size: int, device: torch.device,
                 log=None, extras: dict | None = None, trainable_only: bool = False, ema=None, metrics=None):
        self.run_dir = Path(run_dir)
        self.root = checkpoint_root(run_dir, cfg.dir)
        self.url = is_url(self.root)
        self.fs, self.path = _fs(self.root)
        self._local = isinstance(self.fs, LocalFileSystem)  # a folder or a file:// URL
        self.cfg, self.rank, self.world, self.device = cfg, rank, world_size, device
        self.log, self.metrics = log, metrics
        # LoRA: frozen base weights are not saved (the checkpoint references the base through config.toml)
        self.model_options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        self.ema = ema
        self.extras = extras or {}  # name → (module, optimizer) saved beside the model (e.g. the ITC head)
        self.background = cfg.async_save and (cfg.staging == "background" or
                                              (cfg.staging == "auto" and device.type == "cuda"))
        self.pending: _Save | None = None
        self.stager: PinnedStager | None = None
        # async saves finish their collectives in a background thread: on a group of their own, so they never
        # interleave with the training step's collectives on the default group (that deadlocks gloo)
        self.group = dist.new_group(backend="gloo") if cfg.async_save else None
        self.hashed = cfg.digests and self._local  # object stores check their own uploads
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="ckpt-sha256") if self.hashed else None

    # ---- save -----------------------------------------------------------------------------------------------
    def _app_state(self, model, opt, sched) -> dict:
        if opt is not None:
            flush(opt)  # an offloaded optimizer's queued step lands before the weights and moments are read
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

    def save(self, step: int, model, opt, sched, extra: dict, async_ok: bool = True) -> None:
        """Save the state after `step`, finishing the previous async save first. The seconds training waited go to
        a `checkpoint` metrics event once known: at once, or with background staging when `staged()` returns."""
        t0 = time.perf_counter()
        self.wait()
        name = f"step-{step:08d}"
        target = f"{self.path}/{name}" if self.url else f"{self.path}/.tmp-{name}"
        where = self.fs.unstrip_protocol(target) if self.url else target
        what = f"rank {self.rank}: cannot write checkpoint {where} (the last complete checkpoint is kept)"
        if self.rank == 0:
            with _storage(what, where):
                self._remove(target)  # a leftover of an interrupted save of this step
                if self._local:  # on object stores makedirs would create a missing bucket
                    self.fs.makedirs(target, exist_ok=True)
        dist.barrier()
        with _storage(what, where):
            with self.fs.open(f"{target}/rank-{self.rank}.json", "wb") as f:
                f.write(json.dumps({"step": step, "world_size": self.world, **extra}).encode())
            with self.fs.open(f"{target}/rng-{self.rank}.safetensors", "wb") as f:
                f.write(save_tensors(_rng_state(self.device)))
            state = self._app_state(model, opt, sched)
            # object stores: durable once a file is closed (DCP's fsync fallback would sync the whole local disk)
            writer = FsspecWriter(where, sync_files=False) if self.url else None
            if async_ok and self.cfg.async_save:
                self.pending = self._start(state, step, target, where, writer)
            else:
                dcp.save(state, checkpoint_id=where, storage_writer=writer)
                if self.hashed:
                    digests.write(target, self.rank)
        if self.pending is None:
            self._publish(target, step)
        stall = time.perf_counter() - t0
        if self.pending is not None and self.pending.staging is not None:
            self.pending.stall = stall
        else:
            self._stalled(step, stall)

    def _start(self, state: dict, step: int, target: str, where: str, writer) -> _Save:
        if not self.background:  # DCP's default: a pageable host copy, made before async_save returns
            fut = dcp.async_save(state, checkpoint_id=where, storage_writer=writer, process_group=self.group)
            return _Save(step, target, where, self._then_hash(fut, target))
        if self.stager is None:  # kept for the run: its pinned buffers are allocated once
            self.stager = PinnedStager(self.device)
        res = dcp.async_save(state, checkpoint_id=where, storage_writer=writer, process_group=self.group,
                             async_stager=self.stager)
        return _Save(step, target, where, self._then_hash(res.upload_completion, target), res.staging_completion)

    def _then_hash(self, upload: Future, target: str) -> Future:
        """The upload, then the digests of this rank's files, off the training thread: the save counts as done (and
        is published) once both are."""
        if self.hasher is None:
            return upload
        return self.hasher.submit(lambda: (upload.result(), digests.write(target, self.rank)))

    def prepare(self, model, opt, sched) -> Future | None:
        """With background staging, allocate the pinned buffers in the background once the state's shapes are known
        (after the first optimizer step has created the optimizer state), not at the first save."""
        if not self.background or self.stager is not None:
            return None
        self.stager = PinnedStager(self.device)
        return self.stager.reserve(self._app_state(model, opt, sched))

    def staged(self) -> None:
        """Block until the async save in flight holds its own copy of the state; call it before anything changes
        weights or optimizer state (the optimizer step)."""
        p = self.pending
        if p is None or p.staging is None:
            return
        t0 = time.perf_counter()
        with _storage(f"rank {self.rank}: cannot copy checkpoint step {p.step} to host memory", p.where,
                      "free host memory or set checkpoint.staging = sync"):
            p.staging.result()
        p.staging = None
        self._stalled(p.step, p.stall + time.perf_counter() - t0)

    def poll(self) -> None:
        """Publish the async save in flight once every rank's upload is done, instead of at the next save (a crash
        between the two would resume from the checkpoint before). Called at the same point of every step on every
        rank; the ranks agree first (on the default group, the async saves use their own), as publishing is
        collective."""
        p = self.pending
        if p is None or p.staging is not None:  # a background copy is awaited by staged(), before the optimizer
            return
        done = torch.tensor([1 if p.upload.done() else 0])
        if self.world > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            self.wait()

    def wait(self) -> None:
        """Finish the async save in flight, if any, and publish it."""
        p = self.pending
        if p is None:
            return
        self.staged()
        self.pending = None
        with _storage(f"rank {self.rank}: cannot write checkpoint {p.where} (the last complete checkpoint is kept)",
                      p.where):
            p.upload.result()
        self._publish(p.target, p.step)

    def _stalled(self, step: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.event(step, "checkpoint", stall_s=seconds)

    def _publish(self, target: str, step: int) -> None:
        dist.barrier()  # every rank's files are written
        if self.rank == 0:
            final = f"{self.path}/step-{step:08d}"
            with _storage(f"cannot publish checkpoint {target}", self.root):
                if not self.url:  # atomic: the folder appears whole under its final name
                    self._remove(final)
                    os.rename(target, final)
                run_cfg = self.run_dir / "config.toml"  # a copy inside: export finds the run's config anywhere
                if run_cfg.is_file():
                    self.fs.pipe_file(f"{final}/config.toml", run_cfg.read_bytes())
                self.fs.pipe_file(f"{final}/{DONE}", str(step).encode())
                self._retain()
        dist.barrier()

    def _remove(self, path: str) -> None:
        """Delete a checkpoint folder, its marker first: a half-deleted checkpoint is never resumed."""
        if self.fs.exists(f"{path}/{DONE}"):
            self.fs.rm_file(f"{path}/{DONE}")
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _retain(self) -> None:
        done = _complete(self.fs, self.path)
        keep = set(done[-self.cfg.keep:]) if self.cfg.keep > 0 else set(done)
        for p in done:
            step = int(p.rsplit("-", 1)[1])
            if p not in keep and not (self.cfg.keep_every and step % self.cfg.keep_every == 0):
                try:
                    self._remove(p)
                except Exception as err:  # an old checkpoint left behind costs space, not the run
                    if self.log is not None:
                        self.log.warning(f"checkpoint retention: cannot delete {p}: {_reason(err)}")

    # ---- load -----------------------------------------------------------------------------------------------
    def load(self, path: Path | str, model, opt, sched) -> dict:
        """Load into the (sharded) model/optimizer; returns this rank's extra state (resharded runs get rank 0's
        counters and a note)."""
        state = self._app_state(model, opt, sched)
        if self.cfg.digests:
            t0 = time.perf_counter()
            checked = verify(path, self.rank, self.world)
            if self.log is not None and self.rank == 0:
                self.log.info(f"checked {checked[0]} files ({checked[1] / 2**20:.0f} MiB) of {path} against their "
                              f"SHA-256 in {time.perf_counter() - t0:.1f} s" if checked else
                              f"{path} has no SHA-256 digests (an object store, or written before them): not checked")
        reader = storage_reader(path, read_metadata(path))
        try:
            dcp.load(state, checkpoint_id=str(path), storage_reader=reader)
        except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException; it names the key
            raise load_failure(path, err) from None
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
        fs, p = _fs(path)
        with _storage(f"rank {self.rank}: cannot read {path}", path, "" if is_url(path) else DAMAGED):
            own = f"{p}/rank-{self.rank}.json"
            own = own if fs.exists(own) else f"{p}/rank-0.json"
            extra = json.loads(fs.cat_file(own))
            if not isinstance(extra, dict) or not isinstance(extra.get("step"), int):
                raise ValueError(f"{own} has no step count")
            if extra.get("world_size") == self.world:
                _set_rng_state(load_tensors(fs.cat_file(f"{p}/rng-{self.rank}.safetensors")), self.device)
        extra["resharded"] = extra.get("world_size") != self.world
        return extra
