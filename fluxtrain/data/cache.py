"""`fluxtrain cache`: precomputed VAE posterior moments and text embeddings, and the trainer's loader over them.

Layout of OUT (no pickle anywhere):
  manifest.json               format, model hash, resolution, max_text_tokens, count, shapes, shards, skipped
  empty.safetensors           seq [1, L, D] and pooled [1, P] of the empty prompt (for caption dropout)
  shard-000000.safetensors    latent_mean, latent_std [n, C, h, w], seq [n, L, D], pooled [n, P], all bf16;
                              metadata: captions and keys (JSON lists), count, skipped, model hash, resolution

Work units: with a webdataset source, output shard j holds the usable samples of source shard j (listed order);
with the synthetic source, shard j holds samples [j·P, (j+1)·P) of `SyntheticShapes` (P = --per-shard, first --num).
Rank r of any world size makes the shards j ≡ r (mod world). A shard is written to a temporary name and renamed, so
one that exists is complete: a rerun makes only the missing ones, then rank 0 writes the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxtrain import config as C
from fluxtrain.argtypes import output_dir, positive_int
from fluxtrain.config import ConfigError

FORMAT = "fluxtrain-cache-v1"
KEYS = ("latent_mean", "latent_std", "seq", "pooled")
ENCODER_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
log = logging.getLogger("fluxtrain")


def model_hash(folder: str | Path) -> str:
    """Content hash of the encoders and VAE of a model folder (files over 64 MiB: size + first and last 8 MiB)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for part in ENCODER_PARTS:
        for f in sorted(p for p in (folder / part).rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.relative_to(folder).as_posix()}\0{size}\0".encode())
            with open(f, "rb") as fh:
                if size <= 64 << 20:
                    h.update(fh.read())
                else:
                    h.update(fh.read(8 << 20))
                    fh.seek(size - (8 << 20))
                    h.update(fh.read())
    return h.hexdigest()[:16]


def _shard_file(out: Path, j: int) -> Path:
    return out / f"shard-{j:06d}.safetensors"


# ---------------------------------------------------------------------------------------------- writing


def _units(cfg: C.Config, num: int | None, per_shard: int) -> list:
    d = cfg.data
    if d.source == "webdataset":
        from fluxtrain.data.webdataset import resolve_shards

        return resolve_shards(d.path)
    if d.source == "synthetic":
        if not num or num < 1:
            raise ConfigError("fluxtrain cache with data.source = synthetic needs --num N "
                              "(--num-samples N under torchrun)")
        return [(j * per_shard, min(num, (j + 1) * per_shard)) for j in range(math.ceil(num / per_shard))]
    raise ConfigError("fluxtrain cache reads data.source = synthetic or webdataset (the cache is its output)")


def _samples(cfg: C.Config, unit, skipped: dict):
    """(key, uint8 [H, W, 3], caption) of one unit's usable samples, preprocessed like the streaming loader."""
    from fluxtrain.data.webdataset import decode_sample, fit, read_shard, shard_name

    res = cfg.data.resolution
    if isinstance(unit, tuple):
        from fluxtrain.data.synthetic import SyntheticShapes

        src = SyntheticShapes(size=res, complex_frac=cfg.data.complex_frac, seed=cfg.data.seed)
        for i in range(*unit):
            it = src[i]
            img = fit(it["image"].convert("RGB"), res, res)
            if img is None:
                skipped["too_small"] = skipped.get("too_small", 0) + 1
                continue
            yield str(i), np.asarray(img, dtype=np.uint8), it["caption"]
        return
    name = shard_name(unit)
    for ev in read_shard(unit):
        if ev[0] == "bad":
            skipped[ev[1]] = skipped.get(ev[1], 0) + 1
            log.warning(f"cache: skipped {ev[1]}: shard {name}" + (f" sample {ev[3]}" if ev[3] else "") + f" ({ev[2]})")
            continue
        raw = ev[2]
        r = decode_sample(raw, [(res, res)])
        if r[0] != "ok":
            skipped[r[1]] = skipped.get(r[1], 0) + 1
            log.warning(f"cache: skipped {r[1]}: shard {name} sample {raw['__key__']} ({r[2]})")
            continue
        yield raw["__key__"], r[2], r[3]


def _encode(enc, arrays: list[np.ndarray], captions: list[str], device) -> dict[str, torch.Tensor]:
    from fluxtrain.data.loader import u8_to_pixels

    pixels = u8_to_pixels(torch.from_numpy(np.stack(arrays))).to(device)
    mean, std = enc.vae.moments(pixels)
    seq, pooled = enc.text(captions)
    return {"latent_mean": mean, "latent_std": std, "seq": seq, "pooled": pooled}


def _write_unit(cfg, enc, device, unit, path: Path, meta: dict, batch_size: int) -> int:
    skipped: dict[str, int] = {}
    keys, captions, parts = [], [], {k: [] for k in KEYS}
    arrays, caps = [], []

    def flush():
        if arrays:
            out = _encode(enc, arrays, caps, device)
            for k in KEYS:
                parts[k].append(out[k].to("cpu", torch.bfloat16))
            arrays.clear()
            caps.clear()

    for key, arr, caption in _samples(cfg, unit, skipped):
        keys.append(key)
        captions.append(caption)
        arrays.append(arr)
        caps.append(caption)
        if len(arrays) == batch_size:
            flush()
    flush()
    if keys:
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    else:
        tensors = {}
    source = _source(cfg, unit)
    md = {**meta, "count": str(len(keys)), "captions": json.dumps(captions), "keys": json.dumps(keys),
          "skipped": json.dumps(skipped), "source": source, "source_stamp": _stamp(source)}
    _save_atomic(tensors, path, md)
    return len(keys)


def _save_atomic(tensors: dict, path: Path, metadata: dict) -> None:
    """Write under a temporary name, then rename: a file with the final name is complete."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed run (only this rank writes path)
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; a cache is shared like any data set
    os.replace(tmp, path)


def _source(cfg: C.Config, unit) -> str:
    """What a shard was made from: its input shard, or the synthetic range with what draws it."""
    if isinstance(unit, tuple):
        return f"synthetic[{unit[0]}:{unit[1]}] seed {cfg.data.seed} complex_frac {cfg.data.complex_frac}"
    return unit


def _stamp(source: str) -> str:
    """A local input shard's size and modification time: a shard rewritten under the same name (a copy completed,
    a set regenerated) makes its cache shard stale. Empty for URLs and the synthetic source."""
    try:
        st = os.stat(source)
    except (OSError, ValueError):
        return ""
    return f"{st.st_size} bytes, mtime {st.st_mtime_ns}"


def _check_existing(path: Path, meta: dict, source: str) -> bool:
    """A shard already made (a rerun resumes) must be of this cache: same encoders, resolution, text length and
    input; a shard left by a run with another data.path was reused before, and the cache silently lacked its data."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError: a truncated or overwritten file
        raise ConfigError(f"{path} is damaged ({str(err).splitlines()[0][:200]}): delete it and rerun") from None
    for k, now in (*((k, meta[k]) for k in ("format", "model_hash", "resolution", "max_text_tokens")),
                   ("source", source)):
        if md.get(k) != now:
            raise ConfigError(f"{path} was made with {k} = {md.get(k)} (now {now}): use a new --out for a new "
                              f"cache, or delete the old shards")
    if "source_stamp" in md and md["source_stamp"] != _stamp(source):  # (older caches have no stamp)
        log.warning(f"cache: {source} changed since {path.name} was made from it ({md['source_stamp']}; now "
                    f"{_stamp(source) or 'unreadable'}): caching it again")
        return False
    return True


def build_cache(cfg: C.Config, out: str | Path, num: int | None = None, per_shard: int = 1000,
                batch_size: int = 32) -> dict | None:
    """Make the cache on every rank (torchrun: WORLD_SIZE > 1); rank 0 returns the manifest."""
    import torch.distributed as dist

    from fluxtrain.models.setup import encoders_folder
    from fluxtrain.train import Encoders

    if cfg.data.buckets:
        raise ConfigError("fluxtrain cache does not support data.buckets yet: cache one resolution "
                          "(data.resolution) per cache directory")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    group = world > 1 and not dist.is_initialized()
    if group:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    try:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        units = _units(cfg, num, per_shard)
        folder = encoders_folder(cfg)
        meta = {"format": FORMAT, "model_hash": model_hash(folder), "resolution": str(cfg.data.resolution),
                "max_text_tokens": str(cfg.model.max_text_tokens)}
        # every rank checks every shard, so that a stale cache stops all ranks alike (none waits at the barrier)
        done = {j for j in range(len(units)) if _check_existing(_shard_file(out, j), meta, _source(cfg, units[j]))}
        todo = [j for j in range(rank, len(units), world) if j not in done]
        t0, made = time.perf_counter(), 0
        enc = Encoders(cfg, device) if todo or rank == 0 else None
        for j in todo:
            made += _write_unit(cfg, enc, device, units[j], _shard_file(out, j), meta, batch_size)
        log.info(f"cache rank {rank}: {len(todo)} shard(s), {made} samples in {time.perf_counter() - t0:.1f}s")
        if rank == 0:
            seq, pooled = enc.text([""])
            _save_atomic({"seq": seq.to("cpu", torch.bfloat16).contiguous(),
                          "pooled": pooled.to("cpu", torch.bfloat16).contiguous()}, out / "empty.safetensors", meta)
        if world > 1:
            dist.barrier()
        if rank != 0:
            return None
        manifest = _manifest(out, units, meta, folder, enc)
        tmp = out / f".manifest.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out / "manifest.json")
        return manifest
    finally:
        if group:
            dist.destroy_process_group()


def _manifest(out: Path, units: list, meta: dict, folder: Path, enc) -> dict:
    shards, skipped, shapes, count = [], {}, None, 0
    for j in range(len(units)):
        path = _shard_file(out, j)
        with safe_open(str(path), "pt") as f:
            md = f.metadata()
            n = int(md["count"])
            if n and shapes is None:
                shapes = {k: f.get_slice(k).get_shape()[1:] for k in KEYS}
        for k, v in json.loads(md["skipped"]).items():
            skipped[k] = skipped.get(k, 0) + v
        shards.append({"file": path.name, "count": n, "source": md["source"]})
        count += n
    if count == 0:
        raise ConfigError(f"fluxtrain cache: no usable sample in the source ({sum(skipped.values())} skipped)")
    return {"format": FORMAT, "model_hash": meta["model_hash"], "model_folder": str(folder),
            "resolution": int(meta["resolution"]), "max_text_tokens": int(meta["max_text_tokens"]),
            "dtype": "bfloat16", "compute_dtype": str(enc.vae.vae.dtype).replace("torch.", ""), "count": count,
            "shapes": shapes, "skipped": skipped, "shards": shards}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fluxtrain cache", allow_abbrev=False,
                                 description="precompute VAE latents + T5/CLIP embeddings into shards, on all ranks",
                                 epilog="other options: --section.key value config overrides")
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", type=output_dir, required=True)
    # --num-samples under torchrun: torchrun's own parser takes `--num` for an abbreviation of --numa-binding
    ap.add_argument("--num", "--num-samples", dest="num", type=int, default=None,
                    help="synthetic source: how many samples")
    ap.add_argument("--per-shard", type=positive_int, default=1000, help="synthetic source: samples per shard")
    ap.add_argument("--batch-size", type=positive_int, default=32, help="encoder batch size")
    a, rest = ap.parse_known_args(argv)
    cfg = C.load(a.config, rest)
    rank = int(os.environ.get("RANK", "0"))
    lg = logging.getLogger("fluxtrain")
    (Path(a.out) / "logs").mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(Path(a.out) / "logs" / f"cache-rank-{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler())
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    level = lg.level
    lg.setLevel(logging.INFO)
    for h in handlers:
        h.setFormatter(fmt)
        lg.addHandler(h)
    try:
        manifest = build_cache(cfg, a.out, num=a.num, per_shard=a.per_shard, batch_size=a.batch_size)
    finally:
        for h in handlers:
            lg.removeHandler(h)
            h.close()
        lg.setLevel(level)
    if manifest is not None:
        print(f"cache: {manifest['count']} samples in {len(manifest['shards'])} shard(s), "
              f"{sum(manifest['skipped'].values())} skipped → {Path(a.out) / 'manifest.json'}")
    return 0


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    p = Path(path)
    root = p.parent if p.name == "manifest.json" else p
    if not (root / "manifest.json").is_file():
        raise ConfigError(f"data.path '{path}' is not a cache: no manifest.json (make one with `fluxtrain cache`)")
    manifest = json.loads((root / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{root}/manifest.json: format {manifest.get('format')!r}, expected {FORMAT}")
    return root, manifest


WHOLE_SHARD_BYTES = 64 * 2**20  # × the 64 shards kept open: at most 4 GiB of host memory


class CacheBatches:
    """Index-based micro-batches from a cache, like IndexedBatches: global batch k = positions [k·G, (k+1)·G),
    rank r the r-th slice, so the global batch does not depend on the world size. Position g reads cache entry
    perm_e[g mod N] with e = g // N (a permutation seeded by (data.seed, e); identity with data.shuffle_buffer = 0).
    Batches: latent_mean, latent_std [B, C, h, w], seq [B, L, D], pooled [B, P] (bf16), captions, indices (the
    positions, int64, for per-sample noise) and cache_index (int64)."""

    def __init__(self, root: Path, manifest: dict, batch_size: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = True):
        self.root, self.manifest = root, manifest
        self.bs, self.rank, self.world, self.seed, self.shuffle = batch_size, rank, world_size, seed, shuffle
        self.files = [root / s["file"] for s in manifest["shards"]]
        self.starts = np.cumsum([0] + [s["count"] for s in manifest["shards"]])
        self.n = int(self.starts[-1])
        self.pos, self.skipped = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None
        self._open = lru_cache(maxsize=64)(self._open_shard)

    def _open_shard(self, j: int):
        f = safe_open(str(self.files[j]), "pt")
        # A small shard is read whole once and indexed: sliced reads cost ~40 µs each, four per sample (25 ms a
        # batch of 128, a third of a small model's step). Large shards (1024² latents, 512 T5 tokens) stay sliced.
        whole = {k: f.get_tensor(k) for k in KEYS} if self.files[j].stat().st_size <= WHOLE_SHARD_BYTES else None
        return f, json.loads(f.metadata()["captions"]), whole

    def __iter__(self):
        return self

    def entry(self, g: int) -> int:
        e, k = divmod(g, self.n)
        if not self.shuffle:
            return k
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, np.random.default_rng([self.seed, e, 0xCAC4E]).permutation(self.n))
        return int(self._perm[1][k])

    def read(self, entries: list[int]) -> dict:
        runs: list[list[int]] = []  # [shard, offset, length]: consecutive entries of one shard read as one slice
        for i in entries:
            j = int(np.searchsorted(self.starts, i, side="right") - 1)
            o = i - int(self.starts[j])
            if runs and runs[-1][0] == j and runs[-1][1] + runs[-1][2] == o:
                runs[-1][2] += 1
            else:
                runs.append([j, o, 1])
        out: dict[str, list] = {k: [] for k in KEYS}
        captions: list[str] = []
        for j, o, n in runs:
            f, caps, whole = self._open(j)
            for k in KEYS:
                out[k].append(whole[k][o:o + n] if whole is not None else f.get_slice(k)[o:o + n])
            captions += caps[o:o + n]
        return {**{k: v[0].clone() if len(v) == 1 else torch.cat(v) for k, v in out.items()}, "captions": captions}

    def __next__(self) -> dict:
        start = self.pos + self.rank * self.bs
        idx = list(range(start, start + self.bs))
        self.pos += self.bs * self.world
        entries = [self.entry(g) for g in idx]
        return {**self.read(entries), "indices": torch.tensor(idx, dtype=torch.long),
                "cache_index": torch.tensor(entries, dtype=torch.long)}

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq [1, L, D], pooled [1, P]) bf16 of the empty prompt, for caption dropout."""
        with safe_open(str(self.root / "empty.safetensors"), "pt") as f:
            return f.get_tensor("seq"), f.get_tensor("pooled")

    def state_dict(self) -> dict:
        return {"source": "cache", "pos": self.pos, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.skipped = int(state["pos"]), int(state.get("skipped", 0))

    def close(self) -> None:
        self._open.cache_clear()


def build_cache_loader(cfg: C.Config, rank: int, world_size: int, check_model: bool = True) -> CacheBatches:
    """The trainer's iterator over a cache made by `fluxtrain cache` (data.path = its directory)."""
    root, m = read_manifest(cfg.data.path)
    if m["resolution"] != cfg.data.resolution:
        raise ConfigError(f"cache {root} is at resolution {m['resolution']}, data.resolution is {cfg.data.resolution}")
    if m["max_text_tokens"] != cfg.model.max_text_tokens:
        raise ConfigError(f"cache {root} has {m['max_text_tokens']} text tokens, model.max_text_tokens is "
                          f"{cfg.model.max_text_tokens}")
    if check_model:
        from fluxtrain.models.setup import encoders_folder

        folder = encoders_folder(cfg)
        if model_hash(folder) != m["model_hash"]:
            raise ConfigError(f"cache {root} was made with other encoders/VAE than {folder} (hash {m['model_hash']}): "
                              f"rerun `fluxtrain cache` with this model")
    return CacheBatches(root, m, cfg.train.batch_size, rank, world_size, seed=cfg.data.seed,
                        shuffle=cfg.data.shuffle_buffer > 0)
