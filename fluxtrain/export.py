"""`fluxtrain export`: full-state export of a DCP checkpoint to diffusers or BFL safetensors, offline.

The export streams, a transformer block at a time: DCP reads only the keys asked for (casting into the export dtype
as it copies), BFL's fused tensors are built from one block's tensors, and each tensor is written at the offset
planned up front from the model's shapes, by a few threads at once. Memory holds a few blocks, never the model.
"""

from __future__ import annotations

import argparse
import posixpath
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fluxtrain import config as C
from fluxtrain.argtypes import output_path, positive_int
from fluxtrain.checkpoint import (_fs, _storage, complete_checkpoints, is_url, load_failure, location, read_metadata,
                                  storage_reader, verify)

THREADS = 4  # blocks in flight; each holds one block in the export dtype (0.7 GB for FLUX.1-dev's double blocks)
PIPELINE_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _isfile(fs, f: str) -> bool:
    """fs.isfile, but an unreachable store raises (s3fs's isfile answers False to any error, a wrong endpoint too)."""
    try:
        return fs.info(f)["type"] == "file"
    except FileNotFoundError:
        return False


def run_config_of(ckpt: str | Path) -> C.Config:
    """The run's config: the copy inside the checkpoint (wherever it is stored), else <run>/config.toml two levels up
    (checkpoints saved before the copy existed)."""
    _check_step_folder(ckpt)
    with _storage(f"cannot read {ckpt}", ckpt):
        fs, path = _fs(ckpt)
        run = posixpath.dirname(posixpath.dirname(path))
        found = next((f for f in (f"{path}/config.toml", f"{run}/config.toml") if _isfile(fs, f)), None)
        data = found and fs.cat_file(found)
    if found is None:
        if not is_url(ckpt) and not Path(ckpt).exists():
            raise C.ConfigError(f"{ckpt} does not exist: check the path")
        raise C.ConfigError(f"{ckpt}: no config.toml inside or two levels up; is this a checkpoints/step-N folder?")
    origin = fs.unstrip_protocol(found) if is_url(ckpt) else found
    return C.from_dict(C.parse_toml(data, origin, "fix it or copy the run's config.toml there"), origin)


def _opened(ckpt: str | Path) -> C.Config:
    """The run's config of a checkpoint about to be read, its files checked against their digests first."""
    cfg = run_config_of(ckpt)
    if cfg.checkpoint.digests:
        verify(ckpt)
    return cfg


def _check_step_folder(ckpt) -> None:
    """A local path given for a checkpoint is a step-N folder; a run or checkpoints folder, or a file, is named as such
    with the step to give instead (they were "no config.toml inside" or a missing .metadata)."""
    p = Path(ckpt)
    if is_url(ckpt) or (p / ".metadata").exists():
        return
    if p.is_file():
        raise C.ConfigError(f"{ckpt} is a file: give a checkpoint's step-N folder")
    for kind, root in (("checkpoints", p), ("run", p / "checkpoints")):
        steps = complete_checkpoints(root) if root.is_dir() else []
        if steps:
            raise C.ConfigError(f"{ckpt} is a {kind} folder, not one checkpoint: give a step-N folder, e.g. the "
                                f"newest, {steps[-1]}")


def weights_section(cfg: C.Config) -> str:
    """The checkpoint section exported: the EMA weights where the run keeps them for export."""
    return "ema" if cfg.ema.enabled and cfg.ema.use_for_export else "model"


def _encoders(cfg: C.Config) -> Path | None:
    from fluxtrain.models.setup import encoders_folder

    try:
        return encoders_folder(cfg)
    except FileNotFoundError:  # no encoders/VAE to pair with: the export holds the transformer alone
        return None


def _lora_state(ckpt: str | Path, cfg: C.Config, kw: dict) -> dict[str, torch.Tensor]:
    """A LoRA run's transformer: the checkpoint holds adapters only, merged here into the base it references."""
    from fluxtrain import lora
    from fluxtrain.models.flux import iter_pretrained_state, random_init_state

    base = (dict(iter_pretrained_state(cfg.model.pretrained, kw["num_attention_heads"] * kw["attention_head_dim"]))
            if cfg.model.pretrained and cfg.model.load_transformer else dict(random_init_state(kw, cfg.train.seed)))
    return lora.merge_lora_state(base, lora.lora_state_from_checkpoint(ckpt, weights_section(cfg)), cfg.lora.alpha,
                                 cfg.lora.rank)


def _check_fits(ckpt, known, shapes: dict[str, torch.Size], section: str = "model") -> None:
    """The checkpoint's model has these tensors at these shapes (from its metadata `known` alone), or the first misfit
    is named."""
    from fluxtrain.models.flux import WeightsError

    meta = known.state_dict_metadata
    for k, shape in shapes.items():
        got = getattr(meta.get(f"{section}.{k}"), "size", None)
        if got != shape:
            raise WeightsError(f"{ckpt} does not fit the run's model at '{k}': checkpoint "
                               f"{'has none' if got is None else tuple(got)}, model {tuple(shape)}")


def _read(ckpt, known, into: dict[str, torch.Tensor], section: str = "model") -> dict[str, torch.Tensor]:
    """Fill `into` (model keys → tensors of any dtype: DCP casts as it copies) from the checkpoint's `section`
    ("model" or "ema"), reading only those keys, without a process group (DCP reassembles the shards). `known`: the
    checkpoint's metadata, read once for all blocks (on S3, a fetch of .metadata per block otherwise)."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no process group, on purpose
    try:
        dcp.load({section: into}, storage_reader=storage_reader(ckpt, known), no_dist=True)
    except (Exception, CheckpointException) as err:  # a truncated or deleted .distcp: a traceback before
        raise load_failure(ckpt, err) from None
    return into


def load_checkpoint_model(ckpt: str | Path):
    """An unsharded fp32 transformer with the checkpoint's weights, read without a process group
    (DCP reassembles the shards). Returns (model, run config, folder of encoders/VAE)."""
    from fluxtrain.models.flux import build_transformer
    from fluxtrain.models.setup import model_kwargs

    ckpt = location(ckpt)
    cfg = _opened(ckpt)
    kw = model_kwargs(cfg)
    model = build_transformer(kw, device="cpu")
    if cfg.lora.enabled:
        model.load_state_dict(_lora_state(ckpt, cfg, kw))
    else:
        own = model.state_dict()  # the parameters themselves: DCP loads in place
        known = read_metadata(ckpt)
        _check_fits(ckpt, known, {k: v.shape for k, v in own.items()}, weights_section(cfg))
        _read(ckpt, known, own, weights_section(cfg))
    return model, cfg, _encoders(cfg)


def _groups(keys) -> list[list[str]]:
    """Keys per transformer block, the rest together: each BFL fused tensor's inputs share a group."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        head = k.split(".")
        groups.setdefault(".".join(head[:2]) if head[0].endswith("transformer_blocks") else "", []).append(k)
    return list(groups.values())


def _stream(read, convert, writer, groups: list[list[str]], threads: int) -> None:
    def one(keys: list[str]) -> None:
        for name, t in convert(read(keys)).items():
            writer.write(name, t)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        jobs = [pool.submit(one, g) for g in groups]
        try:
            for j in jobs:
                j.result()
        finally:  # after a failure, start no more blocks
            for j in jobs:
                j.cancel()


def export_lora(ckpt: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    """A LoRA run's adapters in the folder format FluxPipeline.load_lora_weights reads."""
    from fluxtrain import lora

    ckpt = location(ckpt)
    cfg = _opened(ckpt)
    if not cfg.lora.enabled:
        raise C.ConfigError(f"{ckpt} is not a LoRA run (lora.enabled = false): export --format diffusers or bfl")
    meta = lora.lora_metadata(cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets or lora.DEFAULT_TARGETS)
    return lora.write_lora(lora.lora_state_from_checkpoint(ckpt, weights_section(cfg)), out, meta,
                           dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)


def export(ckpt: str | Path, fmt: str, out: str | Path, dtype: str = "bf16", threads: int = THREADS,
           shard_bytes: int | None = None) -> Path:
    """Write the checkpoint's transformer as a FluxPipeline folder (`fmt` "diffusers": the run's encoders/VAE
    beside a transformer/ sharded as diffusers shards it) or a BFL single file (`fmt` "bfl"). Returns the folder or
    file written. It is written beside its place (.partial-NAME) and then takes it: an earlier export there stays
    whole until this one is (a failed re-export had deleted its weights), and none of its parts are kept."""
    out = Path(out)
    final = out if fmt == "diffusers" or out.suffix == ".safetensors" else out / "flux1-transformer.safetensors"
    staging = final.with_name(f".partial-{final.name}")
    _remove(staging)  # a partial export that a crash left
    try:
        _export_to(ckpt, fmt, staging, dtype, threads, shard_bytes)
    except BaseException:
        _remove(staging)
        raise
    replaced = final.with_name(f".replaced-{final.name}")
    _remove(replaced)
    if final.exists():
        final.rename(replaced)
    staging.rename(final)
    _remove(replaced)
    return final


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _export_to(ckpt: str | Path, fmt: str, out: Path, dtype: str, threads: int, shard_bytes: int | None) -> None:
    from fluxtrain.models import bfl
    from fluxtrain.models.flux import SHARD_BYTES, SafetensorsWriter, build_transformer, diffusers_writer
    from fluxtrain.models.setup import model_kwargs

    ckpt, out = location(ckpt), Path(out)
    cfg = _opened(ckpt)
    section = weights_section(cfg)
    kw = model_kwargs(cfg)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    ref = build_transformer(kw, device="meta")  # names, shapes and config, without memory
    plan = {k: v.to(dt) for k, v in ref.state_dict().items()}
    if cfg.lora.enabled:  # the merged state is held whole (its base is a pretrained file or the seeded init)
        state = _lora_state(ckpt, cfg, kw)
        read = lambda keys: {k: state.pop(k).to(dt) for k in keys}  # noqa: E731 — each block freed once written
    else:
        known = read_metadata(ckpt)
        _check_fits(ckpt, known, {k: v.shape for k, v in plan.items()}, section)
        read = lambda keys: _read(ckpt, known, {k: torch.empty(plan[k].shape, dtype=dt) for k in keys},  # noqa: E731
                                  section)
    if fmt == "diffusers":
        folder = _encoders(cfg)
        for part in PIPELINE_PARTS:
            if folder and (folder / part).exists():
                shutil.copytree(folder / part, out / part)
        if folder and (folder / "model_index.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / "model_index.json", out / "model_index.json")
        writer = diffusers_writer({k: (v.shape, dt) for k, v in plan.items()}, dict(ref.config), out / "transformer",
                                  shard_bytes or SHARD_BYTES)
        convert = lambda sd: sd  # noqa: E731
    else:
        writer = SafetensorsWriter({out: {k: (v.shape, dt) for k, v in bfl.diffusers_to_bfl(plan).items()}})
        convert = bfl.diffusers_to_bfl
    with writer:
        _stream(read, convert, writer, _groups(plan), threads)
    if fmt == "diffusers":  # the run's text length, resolution and guidance: `fluxtrain sample`/`eval` default to them
        from fluxtrain.sample import TrainedFor

        TrainedFor.of_run(cfg).write(out)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fluxtrain export")
    ap.add_argument("--checkpoint", required=True, help="a checkpoint step-N folder or URL (s3://…)")
    ap.add_argument("--format", choices=["diffusers", "bfl", "lora"], default="diffusers",
                    help="diffusers folder, BFL single file, or (LoRA runs) the adapters alone; LoRA runs export "
                         "merged weights for diffusers/bfl")
    ap.add_argument("--out", type=output_path, required=True)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=positive_int, default=THREADS,
                    help="transformer blocks read, converted and written at once (each holds a block in memory)")
    a = ap.parse_args(argv)
    from fluxtrain.sample import TRAINED_FOR

    out_dir = Path(a.out)
    if a.format != "bfl" and out_dir.suffix == ".safetensors":
        raise C.ConfigError(f"--out {a.out}: a {a.format} export is a folder (a single .safetensors file is "
                            "--format bfl): give a folder name")
    if a.format == "diffusers" and out_dir.is_dir() and any(out_dir.iterdir()) and not any(
            (out_dir / f).is_file() for f in ("model_index.json", TRAINED_FOR)):  # an earlier export is replaced
        raise C.ConfigError(f"--out {a.out} holds other files (no model_index.json of an earlier export): give a new "
                            "or empty folder")
    out = (export_lora(a.checkpoint, a.out, a.dtype) if a.format == "lora"
           else export(a.checkpoint, a.format, a.out, a.dtype, a.threads))
    print(f"exported to {out}")
    return 0
