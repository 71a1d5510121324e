"""Build, load and save the FLUX transformer (diffusers' FluxTransformer2DModel, used as it is)."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator

import torch
from diffusers import FluxTransformer2DModel
from safetensors import SafetensorError, safe_open

from fluxtrain.models import bfl
from fluxtrain.models.presets import transformer_kwargs


class WeightsError(ValueError):
    """A weights file or folder that does not fit the model, told in one line."""


def build_transformer(preset_or_kwargs: str | dict, device: str | torch.device = "meta") -> FluxTransformer2DModel:
    """The transformer of a preset; on the meta device no memory is taken until `to_empty` + init or load."""
    kwargs = transformer_kwargs(preset_or_kwargs) if isinstance(preset_or_kwargs, str) else dict(preset_or_kwargs)
    with torch.device(device):
        return FluxTransformer2DModel(**kwargs)


def pretrained_kwargs(pretrained: str | Path) -> dict | None:
    """The transformer's config from a diffusers folder, or None for a BFL single file."""
    cfg_file = Path(pretrained) / "transformer" / "config.json"
    if not cfg_file.is_file():
        return None
    raw = json.loads(cfg_file.read_text())
    import inspect

    keys = set(inspect.signature(FluxTransformer2DModel.__init__).parameters) - {"self"}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in keys and not k.startswith("_")}


def _safetensors_files(pretrained: Path) -> list[Path]:
    if pretrained.is_file():
        return [pretrained]
    folder = pretrained / "transformer"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors in {folder}: is '{pretrained}' a diffusers-layout FLUX folder?")
    return files


def iter_pretrained_state(pretrained: str | Path, inner_dim: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(diffusers key, CPU tensor) pairs, one tensor in memory at a time for the diffusers layout.

    BFL files fuse q/k/v, so they are converted as a whole (memory-mapped, so untouched tensors stay on disk).
    """
    files = _safetensors_files(Path(pretrained))
    path = files[0]
    try:
        with safe_open(str(path), framework="pt") as f:
            first_keys = list(f.keys())
        if bfl.is_bfl(first_keys):
            sd = {}
            for path in files:
                with safe_open(str(path), framework="pt") as f:
                    sd.update({k: f.get_tensor(k) for k in f.keys()})
            yield from bfl.bfl_to_diffusers(sd, inner_dim).items()
            return
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
    except SafetensorError as err:  # a truncated or overwritten file: a traceback from the Rust reader before
        raise WeightsError(f"{path} is damaged or not a safetensors file ({str(err)[:200]}): export or download it "
                           "again") from None


def load_state_into(model: torch.nn.Module, items: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy full tensors into the model's (possibly sharded, DTensor) parameters; each rank keeps only its shard.

    Shapes and names are checked: the first mismatch is named in the error.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = dict(model.state_dict())
    seen = set()
    for key, full in items:
        if key not in own:
            raise WeightsError(f"unexpected weight '{key}' (model has no such parameter): wrong preset or file?")
        dst = own[key]
        if tuple(full.shape) != tuple(dst.shape):
            raise WeightsError(f"shape mismatch at '{key}': file {tuple(full.shape)} vs model {tuple(dst.shape)}: wrong preset?")
        with torch.no_grad():
            if isinstance(dst, DTensor):
                local = distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
                dst.to_local().copy_(local.to_local())
            else:
                dst.copy_(full.to(dst.dtype))
        seen.add(key)
    missing = sorted(set(own) - seen)
    if missing:
        raise WeightsError(f"missing weight '{missing[0]}' (and {len(missing) - 1} more) in the pretrained file")


def random_init_state(kw: dict, seed: int, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Full initial tensors one at a time, each from its own generator (seed, name): the same weights whatever
    the sharding or world size, since every rank slices the same full tensor. Linear layers as torch initialises
    them (U(±1/√fan_in)), norm scales one, biases zero."""
    import zlib

    ref = build_transformer(kw, device="meta")
    for mname, mod in ref.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            key = f"{mname}.{pname}" if mname else pname
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            if isinstance(mod, torch.nn.Linear):
                bound = 1.0 / math.sqrt(mod.in_features)
                t = (torch.rand(p.shape, generator=g, device=device) * 2 - 1) * bound
            else:
                t = torch.ones(p.shape, device=device) if pname == "weight" else torch.zeros(p.shape, device=device)
            yield key, t


def init_weights(model: torch.nn.Module, kw: dict, seed: int = 0, device="cpu") -> None:
    load_state_into(model, random_init_state(kw, seed, device))


WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_BYTES = 10 * 10**9  # diffusers' default max_shard_size ("10GB")
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor name → (shape, dtype), in file order


class SafetensorsWriter:
    """Safetensors files laid out up front from names, shapes and dtypes, then filled one tensor at a time, in any
    order and from any thread (`os.pwrite` at the planned offset): no file's contents are ever in memory at once.
    Use as a context manager; leaving it without an error checks that every tensor was written, leaving it with one
    deletes the files (laid out whole, their unwritten tensors are zeros: a failed export looked usable)."""

    def __init__(self, files: dict[Path, Specs]):
        self._fds: list[int] = []
        self._paths = list(files)
        self._at: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        for path, specs in files.items():
            header, end, spans = {"__metadata__": {"format": "pt"}}, 0, {}
            for name, (shape, dt) in specs.items():
                n = math.prod(shape) * dt.itemsize
                header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [end, end + n]}
                spans[name], end = (end, tuple(shape), dt), end + n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as safetensors pads it
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, 8 + len(raw) + end)
            self._at.update({k: (fd, 8 + len(raw) + off, shape, dt) for k, (off, shape, dt) in spans.items()})

    def write(self, name: str, t: torch.Tensor) -> None:
        fd, off, shape, dt = self._at.pop(name)
        if tuple(t.shape) != shape or t.dtype != dt:
            raise WeightsError(f"'{name}' is {tuple(t.shape)} {t.dtype}, planned {shape} {dt}")
        buf = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
        while buf:  # one pwrite moves at most ~2 GiB
            n = os.pwrite(fd, buf, off)
            buf, off = buf[n:], off + n

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        for fd in self._fds:
            os.close(fd)
        if exc_type is not None or self._at:
            for path in self._paths:
                Path(path).unlink(missing_ok=True)
        if exc_type is None and self._at:
            raise WeightsError(f"'{next(iter(self._at))}' (and {len(self._at) - 1} more) never written")


def write_config(config: dict, out_dir: str | Path) -> None:
    """`transformer/config.json` as diffusers writes it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "FluxTransformer2DModel", **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def diffusers_writer(specs: Specs, config: dict, out_dir: str | Path, shard_bytes: int = SHARD_BYTES) -> SafetensorsWriter:
    """A writer of `transformer/` as diffusers saves it: config.json, then one weights file, or shards of at most
    `shard_bytes` (in `specs` order) with the index `from_pretrained` reads. Earlier weights files there are removed."""
    out = Path(out_dir)
    write_config(config, out)
    for old in out.glob("diffusion_pytorch_model*.safetensors*"):
        old.unlink()
    shards, size = [{}], 0
    for name, (shape, dt) in specs.items():
        n = math.prod(shape) * dt.itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = (shape, dt), size + n
    if len(shards) == 1:
        return SafetensorsWriter({out / WEIGHTS: shards[0]})
    stem = WEIGHTS.removesuffix(".safetensors")
    files = {out / f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    total = sum(math.prod(shape) * dt.itemsize for shape, dt in specs.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: p.name for p, s in files.items() for k in s}}
    (out / f"{WEIGHTS}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return SafetensorsWriter(files)
