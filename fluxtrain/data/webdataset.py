"""Streaming WebDataset shards for the trainer: rank/worker split, shuffling, buckets, bad-data accounting and a
resumable position.

Shards: `data.path` is a glob (`/d/shard-*.tar`), a brace pattern (`/d/shard-{000000..000099}.tar`), a `pipe:`
command (brace patterns allowed; only from the config or command line) or `@list.txt` (one local path, glob, brace
pattern, `file:` or `http(s):` URL per line; relative paths are relative to the list file; `pipe:` lines refused).

Split, per epoch e (shard order = a permutation seeded by (data.seed, e), the same on every rank): with T = ranks ×
workers slots, slot s = rank + world·worker. With at least T shards, slot s reads shards order[s::T] (round-robin by
rank, then by worker); with fewer, every slot reads every shard and keeps the samples whose running number in the
epoch's stream is ≡ s (mod T). Either way each sample of an epoch goes to exactly one slot. Every slot iterates
forever (epoch after epoch), so all ranks yield the same number of batches; a slot with more shards simply reaches
the next epoch later. Each slot shuffles its stream with a buffer of `data.shuffle_buffer` raw samples seeded by
(data.seed, e, s), then decodes, resizes + centre-crops to the resolution (or to its aspect-ratio bucket) and emits a
batch whenever one bucket holds `train.batch_size` samples.

Sample ids (`indices`): epoch << 47 | shard << 24 | n, with `shard` the shard's place in the listed order and `n` the
sample's place in its tar. They are the same whatever the world size or worker count, unique across epochs, and
identical after a resume.

Resume: a slot's position is (epoch, raw samples consumed from its shuffled stream, the (epoch, position) of the
samples still waiting in bucket lists). A resumed slot re-reads its stream deterministically and skips what was
consumed (reading tar bytes again, decoding only the waiting samples): exact, but a resume costs re-reading up to
one epoch of this slot's shards. With another world size, worker count or shard list, the position restarts at the
start of the saved epoch (logged).

Bad data (counted by reason in `skipped_by_reason`, each logged with its shard): `unreadable` (shard can't be opened
or isn't a tar), `empty` (a valid tar with no files), `truncated` (tar ends mid-archive; the complete samples before it are kept, the partial one counted
once), `no_image`, `decode_error`, `no_caption` (missing or empty), `bad_caption` (not UTF-8), `too_small` (would need
upscaling to the resolution/bucket). If more than `data.max_skip_frac` of the last `skip_window` outcomes (samples
and shard errors) were bad, or a slot gets no usable sample in a whole epoch, iteration stops with a one-line
DataError naming the shard.

Captions: with `data.caption_augment` = p > 0, a sample's caption is replaced with probability p by one composed from
its `.json` scene metadata (data/augment.py), drawn from (data.seed, sample id), so a resume sees the same captions.
Samples without usable metadata keep their caption and are counted (`no_scene` in the state; logged at 1, 10, 100, …).
"""

from __future__ import annotations

import copy
import glob as globlib
import hashlib
import logging
import math
import os
import random
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import torch
from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from fluxtrain.config import Config, ConfigError
from fluxtrain.data.augment import augment_caption
from fluxtrain.data.images import decode_rgb
from fluxtrain.data.loader import u8_to_pixels

log = logging.getLogger("fluxtrain")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
CAPTION_EXTS = ("txt", "caption")
EPOCH_SHIFT, SHARD_SHIFT = 47, 24  # sample id = epoch << 47 | shard << 24 | sample-in-shard
SKIP_WINDOW = 200
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")
_LIST_SCHEMES = ("file", "http", "https")


class DataError(RuntimeError):
    """Unusable data, told in one line naming the shard."""


# ---------------------------------------------------------------------------------------------- shard lists


def resolve_shards(spec: str) -> list[str]:
    """`data.path` → the list of shard URLs (see the module docstring)."""
    spec = spec.strip()
    if spec.startswith("@"):
        return _some_exist(_read_list_file(Path(spec[1:])), spec)
    if spec.startswith("pipe:"):
        return list(braceexpand.braceexpand(spec))
    return _some_exist(_expand(spec, "data.path", None), spec)


def _read_list_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"shard list '{path}' not found (data.path = @FILE needs a file of shard paths)")
    urls: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        scheme = _SCHEME.match(line)
        if scheme and scheme.group(1) == "pipe":
            raise ConfigError(f"{path}:{n}: 'pipe:' URLs are refused in shard-list files (they run shell commands); "
                              f"give a pipe: URL in data.path on the command line or in the config instead")
        if scheme and scheme.group(1) not in _LIST_SCHEMES:
            raise ConfigError(f"{path}:{n}: '{scheme.group(1)}:' URLs are not accepted in shard-list files "
                              f"(local paths, file: and http(s): only)")
        urls += _expand(line, f"{path}:{n}", path.parent)
    if not urls:
        raise ConfigError(f"shard list '{path}' names no shards")
    return urls


def _expand(spec: str, origin: str, base: Path | None) -> list[str]:
    out: list[str] = []
    for p in braceexpand.braceexpand(spec):
        if _SCHEME.match(p):
            out.append(p)
            continue
        path = os.path.join(base, p) if base is not None and not os.path.isabs(p) else p
        if any(c in path for c in "*?["):
            hits = sorted(globlib.glob(path))
            if not hits:
                raise ConfigError(f"{origin}: '{p}' matches no files")
            out += hits
        else:
            out.append(path)
    return out


def _some_exist(urls: list[str], spec: str) -> list[str]:
    local = [u for u in urls if not _SCHEME.match(u)]
    folder = next((u for u in local if os.path.isdir(u)), None)
    if folder is not None:  # read as a shard it failed per sample, then "no usable sample"
        raise ConfigError(f"data.path '{spec}': {folder} is a folder: give a glob of its shards, e.g. "
                          f"'{folder.rstrip('/')}/*.tar'")
    if local and len(local) == len(urls) and not any(os.path.exists(u) for u in local):
        raise ConfigError(f"data.path '{spec}': none of its {len(local)} shard file(s) exists")
    return urls


def shard_name(url: str) -> str:
    if url.startswith("pipe:"):
        words = url[5:].split()
        return os.path.basename(words[-1]) if words else url
    return os.path.basename(url.rstrip("/")) or url


# ---------------------------------------------------------------------------------------------- reading & decoding


def read_shard(url: str):
    """One shard's samples in tar order: ("sample", n, {"__key__", ext: bytes…}) and ("bad", reason, detail, key).

    A complete sample is held back until the next one is complete, so that a truncation is reported before the last
    good sample of its shard (the error is then never the trailing event of a stream). On a read error the sample
    being assembled is dropped (counted once as the shard's error) unless the failing member already belonged to
    the next sample; when the error is in a member header, it is kept if it has an image and a caption."""
    errors: list[BaseException] = []
    attempted = [None]

    def handler(exn):
        errors.append(exn)
        return False

    def select(fname):
        attempted[0] = fname
        return True

    try:
        stream = gopen(url, "rb")
    except Exception as exn:  # noqa: BLE001 - any failure to open is "unreadable"
        yield ("bad", "unreadable", f"{type(exn).__name__}: {exn}", None)
        return
    done = cur = None
    members = groups = 0
    try:
        try:
            for f in tar_file_iterator(stream, handler=handler, select_files=select):
                members += 1
                attempted[0] = None
                prefix, suffix = base_plus_ext(f["fname"])
                if prefix is None:
                    continue
                if cur is not None and prefix == cur["__key__"]:
                    cur.setdefault(suffix.lower(), f["data"])
                    continue
                if done is not None:
                    yield ("sample", done["__n__"], done)
                done, cur = cur, {"__key__": prefix, "__n__": groups, suffix.lower(): f["data"]}
                groups += 1
        except Exception as exn:  # noqa: BLE001 - tarfile/gzip/pipe errors alike
            errors.append(exn)
    finally:
        try:
            stream.close()
        except Exception as exn:  # noqa: BLE001 - a failing pipe: command reports here
            errors.append(exn)
    partial = None
    if errors and cur is not None:
        failing = attempted[0] and base_plus_ext(attempted[0])[0]
        complete = (failing != cur["__key__"]) if failing else (
            any(e in cur for e in IMAGE_EXTS) and any(e in cur for e in CAPTION_EXTS))
        if complete:
            partial = failing
        else:
            partial, cur = cur["__key__"], None
    if errors:
        exn = errors[0]
        text = (str(exn).splitlines()[0] if str(exn) else "").split(" @ ")[0]
        reason = "truncated" if members or "unexpected end" in text else "unreadable"
        yield ("bad", reason, f"{type(exn).__name__}: {text}"[:300], partial)
    elif not members:  # a valid tar with no files: a shard written by a job that died, say; never silent
        yield ("bad", "empty", "a tar archive with no files", None)
    if cur is not None:
        if done is not None:
            yield ("sample", done["__n__"], done)
        done = cur
    if done is not None:
        yield ("sample", done["__n__"], done)


def choose_bucket(h: int, w: int, buckets: list[tuple[int, int]]) -> int:
    """The bucket nearest in log aspect ratio (first one on ties)."""
    a = math.log(w / h)
    return min(range(len(buckets)), key=lambda i: abs(a - math.log(buckets[i][1] / buckets[i][0])))


def fit(img: Image.Image, bh: int, bw: int) -> Image.Image | None:
    """Resize (never up) so that the image covers bh×bw, then centre-crop; None if it is smaller than that."""
    w, h = img.size
    scale = max(bh / h, bw / w)
    if scale > 1.0:
        return None
    if (w, h) != (bw, bh):
        nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - bw) // 2, (nh - bh) // 2
        img = img.crop((left, top, left + bw, top + bh))
    return img


def decode_sample(raw: dict, buckets: list[tuple[int, int]]):
    """Raw tar fields → ("ok", bucket, uint8 array [H, W, 3], caption) or ("bad", reason, detail)."""
    cap_ext = next((e for e in CAPTION_EXTS if e in raw), None)
    if cap_ext is None:
        return ("bad", "no_caption", "no ." + "/.".join(CAPTION_EXTS))
    try:
        caption = raw[cap_ext].decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        return ("bad", "bad_caption", str(exn)[:200])
    if not caption:
        return ("bad", "no_caption", "empty caption")
    img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if img_ext is None:
        return ("bad", "no_image", "no image field")
    try:
        img = decode_rgb(raw[img_ext])
    except Exception as exn:  # noqa: BLE001 - PIL raises many kinds
        return ("bad", "decode_error", f"{type(exn).__name__}: {exn}"[:200])
    b = choose_bucket(img.height, img.width, buckets)
    bh, bw = buckets[b]
    out = fit(img, bh, bw)
    if out is None:
        return ("bad", "too_small", f"{img.width}x{img.height} < {bw}x{bh}")
    return ("ok", b, np.asarray(out, dtype=np.uint8), caption)


# ---------------------------------------------------------------------------------------------- one slot's stream


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs (picklable)."""

    urls: tuple[str, ...]
    rank: int
    world: int
    workers: int  # logical workers per rank (≥ 1)
    seed: int
    shuffle_buffer: int
    batch_size: int
    buckets: tuple[tuple[int, int], ...]
    max_skip_frac: float
    skip_window: int = SKIP_WINDOW
    caption_augment: float = 0.0

    @property
    def slots(self) -> int:
        return self.world * self.workers

    @property
    def by_shard(self) -> bool:
        return len(self.urls) >= self.slots

    def slot(self, worker: int) -> int:
        return self.rank + self.world * worker


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)]


def fresh_state(epoch: int = 0) -> dict:
    return {"epoch": epoch, "pos": 0, "good": 0, "pending": [], "window": ""}


def _epoch_stream(plan: Plan, worker: int, epoch: int):
    """This slot's share of one epoch after the shuffle buffer: ("item", id, name, key, raw) and ("bad", reason,
    name, key, detail). Shard-level errors pass through at once; samples are delayed by the buffer."""
    s, T = plan.slot(worker), plan.slots
    order = epoch_order(len(plan.urls), plan.seed, epoch)
    mine = order[s::T] if plan.by_shard else order

    def raw():
        count = 0
        for si in mine:
            name = shard_name(plan.urls[si])
            for ev in read_shard(plan.urls[si]):
                if ev[0] == "bad":
                    if plan.by_shard or si % T == s:  # shard errors: reported by one slot only
                        yield ("bad", ev[1], name, ev[3], ev[2])
                    continue
                _, n, sample = ev
                if not plan.by_shard:
                    count += 1
                    if (count - 1) % T != s:
                        continue
                if n >= 1 << SHARD_SHIFT or si >= 1 << (EPOCH_SHIFT - SHARD_SHIFT):
                    raise DataError(f"shard {name}: more than {1 << SHARD_SHIFT} samples per shard or "
                                    f"{1 << (EPOCH_SHIFT - SHARD_SHIFT)} shards are not supported")
                yield ("item", (epoch << EPOCH_SHIFT) | (si << SHARD_SHIFT) | n, name, sample["__key__"], sample)

    rng = random.Random(f"fluxtrain-shuffle:{plan.seed}:{epoch}:{s}")
    buf: list = []
    size = max(1, plan.shuffle_buffer)
    for ev in raw():
        if ev[0] == "bad" or size == 1:
            yield ev
            continue
        if len(buf) < size:
            buf.append(ev)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = ev
    rng.shuffle(buf)
    yield from buf


def _decode(plan: Plan, item) -> tuple:
    """decode_sample, then data.caption_augment: ("ok", bucket, array, caption, no usable scene metadata) or
    ("bad", reason, detail)."""
    res = decode_sample(item[4], plan.buckets)
    if res[0] != "ok":
        return res
    if not plan.caption_augment:
        return (*res, False)
    caption, usable = augment_caption(item[4].get("json"), res[3], plan.caption_augment, plan.seed, item[1])
    return (*res[:3], caption, not usable)


def worker_batches(plan: Plan, worker: int, state: dict):
    """Batches of one slot, forever, resuming from `state` (see the module docstring). Each batch carries the
    slot's state after it and the bad-data events since the previous batch; a stop is an {"error": …} item."""
    B = plan.batch_size
    epoch, start, good = int(state["epoch"]), int(state["pos"]), int(state["good"])
    window = deque((int(c) for c in state["window"]), maxlen=plan.skip_window)
    pending: list[list] = [[] for _ in plan.buckets]
    want: dict[int, set[int]] = {}
    for e, p in state["pending"]:
        want.setdefault(int(e), set()).add(int(p))

    def place(e, p, item):
        res = _decode(plan, item)
        if res[0] != "ok":  # deterministic decoding: a waiting sample decodes again
            raise DataError(f"shard {item[2]}: sample {item[3]} no longer decodes on resume ({res[1]})")
        pending[res[1]].append((e, p, item[1], f"{item[2]}/{item[3]}", *res[2:]))

    for e in sorted(k for k in want if k < epoch):  # waiting samples from earlier epochs
        last, p = max(want[e]), 0
        for item in _epoch_stream(plan, worker, e):
            if item[0] != "item":
                continue
            if p in want[e]:
                place(e, p, item)
            if p >= last:
                break
            p += 1

    def batch_of(b: int, epoch: int, pos: int) -> dict:
        batch, pending[b] = pending[b], []
        st = {"epoch": epoch, "pos": pos, "good": good, "window": "".join(map(str, window)),
              "pending": sorted([e, q] for lst in pending for (e, q, *_rest) in lst)}
        return {"worker": worker, "state": st, "pixels": torch.from_numpy(np.stack([x[4] for x in batch])),
                "captions": [x[5] for x in batch], "keys": [x[3] for x in batch],
                "no_scene": [x[3] for x in batch if x[6]],
                "indices": torch.tensor([x[2] for x in batch], dtype=torch.long)}

    events: list = []
    while True:
        pos = 0
        for item in _epoch_stream(plan, worker, epoch):
            if item[0] == "bad":
                if pos < start:
                    continue  # counted before the saved position
                _, reason, name, key, detail = item
                events.append((reason, name, key, detail))
            else:
                p, pos = pos, pos + 1
                if p < start:
                    if p in want.get(epoch, ()):
                        place(epoch, p, item)
                    continue
                res = _decode(plan, item)
                if res[0] == "ok":
                    window.append(0)
                    good += 1
                    pending[res[1]].append((epoch, p, item[1], f"{item[2]}/{item[3]}", *res[2:]))
                    if len(pending[res[1]]) == B:
                        yield {**batch_of(res[1], epoch, pos), "events": events}
                        events = []
                    continue
                events.append((res[1], item[2], item[3], res[2]))
            window.append(1)
            bad = sum(window)
            if len(window) == plan.skip_window and bad > plan.max_skip_frac * plan.skip_window:
                ev = events[-1]
                yield {"worker": worker, "events": events,
                       "error": f"rank {plan.rank}: {bad} of the last {plan.skip_window} samples were bad (more than "
                                f"data.max_skip_frac = {plan.max_skip_frac}); last: {ev[0]} in shard {ev[1]} ({ev[3]})"}
                return
        if good == 0:
            order = epoch_order(len(plan.urls), plan.seed, epoch)
            names = sorted({shard_name(plan.urls[i]) for i in (order[plan.slot(worker)::plan.slots]
                                                               if plan.by_shard else order)})
            shown = ", ".join(names[:5]) + (f" … ({len(names)} shards)" if len(names) > 5 else "")
            last = f" (last problem: {events[-1][0]} in {events[-1][1]})" if events else ""
            yield {"worker": worker, "events": events,
                   "error": f"rank {plan.rank} worker {worker}: no usable sample in epoch {epoch} of shard(s) "
                            f"{shown}{last}"}
            return
        epoch, start, good = epoch + 1, 0, 0


class _Streams(torch.utils.data.IterableDataset):
    """DataLoader worker d runs logical worker (d + offset) % W: after a resume the first batch comes from the
    logical worker that was next, so the batch order continues exactly."""

    def __init__(self, plan: Plan, states: list[dict], offset: int):
        super().__init__()
        self.plan, self.states, self.offset = plan, states, offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = ((info.id if info else 0) + self.offset) % self.plan.workers
        return worker_batches(self.plan, w, self.states[w])


# ---------------------------------------------------------------------------------------------- the trainer's iterator


class WebDatasetBatches:
    """Stateful iterator of local micro-batches from WebDataset shards: {"pixels" [B, 3, H, W] float in [-1, 1],
    "captions" list[str], "indices" int64 [B], "keys" list["shard/key"]}."""

    def __init__(self, plan: Plan, num_workers: int = 0):
        self.plan, self.num_workers = plan, num_workers
        self.fingerprint = hashlib.sha256("\n".join(plan.urls).encode()).hexdigest()[:16]
        self.worker_states = [fresh_state() for _ in range(plan.workers)]
        self.next_worker = 0
        self.batches = 0
        self.skipped = 0
        self.skipped_by_reason: dict[str, int] = {}
        self.no_scene = 0  # samples data.caption_augment found no usable scene metadata for
        self._it = None
        if not plan.by_shard:
            log.info(f"rank {plan.rank}: {len(plan.urls)} shard(s) for {plan.slots} rank×worker slots: every slot "
                     f"reads every shard and keeps 1/{plan.slots} of the samples (more shards read faster)")

    def __iter__(self):
        return self

    def _start(self):
        ds = _Streams(self.plan, copy.deepcopy(self.worker_states), self.next_worker)
        if self.num_workers == 0:
            self._it = iter(ds)
        else:
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                 prefetch_factor=2, persistent_workers=False)
            self._it = iter(loader)

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        item = next(self._it)
        for reason, name, key, detail in item["events"]:
            self.skipped += 1
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
            log.warning(f"data: skipped {reason}: shard {name}" + (f" sample {key}" if key else "") + f" ({detail})")
        if "error" in item:
            self.close()
            raise DataError(item["error"])
        w = item["worker"]
        self.worker_states[w] = item["state"]
        self.next_worker = (w + 1) % self.plan.workers
        self.batches += 1
        if item["no_scene"]:
            before, self.no_scene = self.no_scene, self.no_scene + len(item["no_scene"])
            if len(str(self.no_scene)) > len(str(before)) or not before:  # a power of ten passed: 1, 10, 100, …
                log.warning(f"data: {self.no_scene} sample(s) so far without usable scene metadata (.json) keep "
                            f"their captions under data.caption_augment (latest: {item['no_scene'][-1]})")
        return {"pixels": u8_to_pixels(item["pixels"]), "captions": item["captions"], "indices": item["indices"],
                "keys": item["keys"]}

    def state_dict(self) -> dict:
        return {"source": "webdataset", "rank": self.plan.rank, "world_size": self.plan.world,
                "num_workers": self.plan.workers, "shards": self.fingerprint, "batches": self.batches,
                "workers": copy.deepcopy(self.worker_states), "next_worker": self.next_worker,
                "epoch": min(s["epoch"] for s in self.worker_states), "skipped": self.skipped,
                "skipped_by_reason": dict(self.skipped_by_reason), "no_scene": self.no_scene}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.skipped = int(state.get("skipped", 0))
        self.skipped_by_reason = {str(k): int(v) for k, v in state.get("skipped_by_reason", {}).items()}
        self.no_scene = int(state.get("no_scene", 0))
        same = (state.get("world_size") == self.plan.world and state.get("rank") == self.plan.rank
                and state.get("num_workers") == self.plan.workers and state.get("shards") == self.fingerprint
                and "workers" in state)
        if same:
            self.worker_states = copy.deepcopy(state["workers"])
            self.next_worker = int(state["next_worker"])
            self.batches = int(state.get("batches", 0))
            return
        epoch = int(state.get("epoch", 0))
        self.worker_states = [fresh_state(epoch) for _ in range(self.plan.workers)]
        self.next_worker, self.batches = 0, 0
        log.warning(f"data: saved position is for another world size, worker count or shard list; restarting "
                    f"at the start of epoch {epoch}")

    def close(self) -> None:
        it, self._it = self._it, None
        if it is None:
            return
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        elif hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def check_buckets(buckets, resolution: int) -> tuple[tuple[int, int], ...]:
    if not buckets:
        return ((resolution, resolution),)
    out = []
    for b in buckets:
        if len(b) != 2 or any(int(x) < 16 or int(x) % 16 for x in b):
            raise ConfigError(f"data.buckets: {b} is not [height, width] with multiples of 16 "
                              f"(VAE ×8 and 2×2 packing)")
        out.append((int(b[0]), int(b[1])))
    return tuple(out)


def plan_from_config(cfg: Config, rank: int, world_size: int, skip_window: int = SKIP_WINDOW) -> Plan:
    d = cfg.data
    return Plan(urls=tuple(resolve_shards(d.path)), rank=rank, world=world_size, workers=max(1, d.num_workers),
                seed=d.seed, shuffle_buffer=d.shuffle_buffer, batch_size=cfg.train.batch_size,
                buckets=check_buckets(d.buckets, d.resolution), max_skip_frac=d.max_skip_frac,
                skip_window=skip_window, caption_augment=d.caption_augment)


def build_webdataset_loader(cfg: Config, rank: int, world_size: int, skip_window: int = SKIP_WINDOW):
    """The trainer's iterator over `data.path` shards for this rank (DataLoader workers: `data.num_workers`)."""
    return WebDatasetBatches(plan_from_config(cfg, rank, world_size, skip_window), cfg.data.num_workers)
