"""`fluxtrain data clean --in GLOB --out DIR`: drop bad (image, caption) pairs from WebDataset shards.

Each sample, in shard order, gets the first reason that applies (the rest are not evaluated):

- `unreadable_shard`: not counted per sample; a shard that can't be opened or ends mid-archive is listed in the
  report's `shard_errors` (complete samples before the damage are kept)
- `no_image` / `broken_image`: no image member, or the image doesn't decode (truncated, corrupt, not an image)
- `no_caption`: missing, empty or not UTF-8 caption
- `aspect_ratio`: longer side over shorter side > `max_aspect` (3:1)
- `duplicate`: a near-duplicate of an image already *kept* (or awaiting its CLIP score): 64-bit DCT perceptual
  hash (pHash) within Hamming distance `hash_distance` (4), confirmed by box-filtered thumbnails: 16×16 RGB within
  `thumb_tolerance` (36/255) and 32×32 luminance within `luma_tolerance` (24/255) in every cell. The confirmation
  matters for flat synthetic scenes: a 64-bit luminance hash can't tell a small purple square from a purple circle
  at the same spot (a quarter of 2,000 synthetic 64-px images had a different image within 4 bits; with the
  confirmation, none). Caught at 64 px: exact copies, 1.5x upscales, JPEG q>=90 re-encodes, small brightness
  shifts; missed at 64 px: non-integer downscales and JPEG q<=80 (edge resampling/chroma bleeding exceed the
  tolerances at this size; at photo sizes the thumbnails of such copies agree much more closely).
  Candidates come from a multi-index (5 bands of the hash: two hashes within 4 bits share at least one band).
- `caption_mismatch`: the caption parses in the synthetic grammar and the shapes checker says the image doesn't
  satisfy it (wrong colour, shape, count, relation, extra object)
- `clip_low`: the caption is outside the grammar, `clip_dir` (a local CLIP model folder) is given and the CLIP score
  (100 × cosine) is below `clip_min`. Without `clip_dir` such pairs are kept and counted as `unchecked`.

Kept samples are written unchanged (every member's bytes) to DIR/shard-%06d.tar; DIR/report.json has the counts
per reason, the dropped keys per reason, and the shard errors. One summary line is printed.
"""

from __future__ import annotations

import argparse
import glob as globlib
import json
import os
import tarfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from fluxtrain.data.images import decode_rgb

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
CAPTION_EXTS = ("txt", "caption")
REASONS = ("no_image", "broken_image", "no_caption", "aspect_ratio", "duplicate", "caption_mismatch", "clip_low")


# ------------------------------------------------------------------------------------------------ reading shards

def expand_shards(spec: str) -> list[str]:
    """A glob and/or brace pattern (or several, comma-free, space-separated) → sorted existing local tar files."""
    import braceexpand

    out: list[str] = []
    for part in str(spec).split():
        found = []
        for p in braceexpand.braceexpand(part):
            if os.path.isdir(p):
                raise IsADirectoryError(f"'{p}' is a folder: give a glob of its shards, e.g. '{p.rstrip('/')}/*.tar'")
            found += sorted(globlib.glob(p)) if any(c in p for c in "*?[") else ([p] if os.path.exists(p) else [])
        if not found:  # one pattern of several matching nothing is a typo, not fewer shards
            raise FileNotFoundError(f"no shard files match '{part}'" + (f" (of '{spec}')" if part != spec else ""))
        out += found
    return out


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the extension starts at the first '.' of the base name."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext


def iter_samples(shards: list[str], errors: list[dict] | None = None) -> Iterator[dict]:
    """Samples of tar shards as WebDataset groups them (consecutive members sharing a key): {"__key__",
    "__shard__", ext: bytes, ...}. A shard that fails to open or ends mid-archive is recorded in `errors` (the
    complete samples read before the failure are yielded, the partial one is not)."""
    for shard in shards:
        cur: dict | None = None
        try:
            with tarfile.open(shard, "r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_name(m.name)
                    if not ext or os.path.basename(key).startswith("."):
                        continue
                    if cur is not None and cur["__key__"] != key:  # before this member is read: cut short,
                        yield cur  # it must not take the complete sample before it along
                        cur = None
                    if cur is None:
                        cur = {"__key__": key, "__shard__": shard}
                    cur[ext.lower()] = tf.extractfile(m).read()
            if cur is not None:
                yield cur
        except (tarfile.TarError, OSError, EOFError) as err:
            if errors is not None:
                errors.append({"shard": shard, "error": f"{type(err).__name__}: {err}",
                               "partial_key": cur["__key__"] if cur else None})


def image_of(sample: dict) -> tuple[str | None, Image.Image | None]:
    """(image extension, decoded RGB image) — (ext, None) if it doesn't decode, (None, None) if there's none."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None, None
    try:
        return ext, decode_rgb(sample[ext])
    except Exception:  # noqa: BLE001 - PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        return ext, None


def caption_of(sample: dict) -> str | None:
    ext = next((e for e in CAPTION_EXTS if e in sample), None)
    if ext is None:
        return None
    try:
        text = sample[ext].decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


# ------------------------------------------------------------------------------------------------ near-duplicates

_N = 32
_K = np.arange(_N)
_DCT = np.sqrt(2 / _N) * np.cos(np.pi * (2 * _K[None, :] + 1) * _K[:, None] / (2 * _N))
_DCT[0] /= np.sqrt(2)


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash: luminance at 32×32, 2-D DCT-II, the 8×8 lowest frequencies above their median
    (median taken without the DC term)."""
    g = np.asarray(image.convert("L").resize((_N, _N), Image.BILINEAR), np.float64)
    c = (_DCT @ g @ _DCT.T)[:8, :8].ravel()
    bits = c > np.median(c[1:])
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def thumbnail(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(16×16 RGB, 32×32 luminance) box-filtered thumbnails, uint8: the confirmation step of `NearDuplicateIndex`."""
    rgb = image.convert("RGB")
    return (np.asarray(rgb.resize((16, 16), Image.BOX), np.uint8),
            np.asarray(rgb.convert("L").resize((32, 32), Image.BOX), np.uint8))


def _maxdiff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


class NearDuplicateIndex:
    """Kept images' hashes + thumbnails; `find(image)` → key of a near-duplicate already added, or None."""

    BANDS = ((0, 13), (13, 26), (26, 39), (39, 52), (52, 64))

    def __init__(self, max_distance: int = 4, thumb_tolerance: int = 36, luma_tolerance: int = 24):
        assert max_distance < len(self.BANDS), "pigeonhole lookup needs max_distance < number of bands"
        self.max_distance, self.tol, self.luma_tol = max_distance, thumb_tolerance, luma_tolerance
        self.tables = [defaultdict(list) for _ in self.BANDS]
        self.hashes: list[int] = []
        self.thumbs: list[tuple[np.ndarray, np.ndarray]] = []
        self.keys: list[str] = []

    @classmethod
    def _bands(cls, h: int) -> list[int]:
        return [(h >> (64 - hi)) & ((1 << (hi - lo)) - 1) for lo, hi in cls.BANDS]

    def find(self, image: Image.Image, h: int | None = None, th: tuple | None = None) -> str | None:
        h = phash(image) if h is None else h
        th = thumbnail(image) if th is None else th
        cands = set()
        for table, b in zip(self.tables, self._bands(h)):
            cands.update(table.get(b, ()))
        for i in sorted(cands):
            rgb, luma = self.thumbs[i]
            if (bin(h ^ self.hashes[i]).count("1") <= self.max_distance and _maxdiff(rgb, th[0]) <= self.tol
                    and _maxdiff(luma, th[1]) <= self.luma_tol):
                return self.keys[i]
        return None

    def add(self, key: str, image: Image.Image, h: int | None = None, th: tuple | None = None) -> None:
        h = phash(image) if h is None else h
        i = len(self.hashes)
        self.hashes.append(h)
        self.thumbs.append(thumbnail(image) if th is None else th)
        self.keys.append(key)
        for table, b in zip(self.tables, self._bands(h)):
            table[b].append(i)


# ------------------------------------------------------------------------------------------------ caption checks

def grammar_check(image: Image.Image, caption: str) -> bool | None:
    """True/False: the shapes checker's verdict for a caption in the synthetic grammar; None: outside the grammar."""
    from fluxtrain.data.prompts import parse_prompt
    from fluxtrain.eval.shapes_checker import check

    try:
        parse_prompt(caption)
    except ValueError:
        return None
    return check(image, caption).passed


class _ClipBatcher:
    """Scores (image, caption) pairs with a local CLIP model in batches; decisions come back via `flush`."""

    def __init__(self, clip_dir, batch: int = 32):
        from fluxtrain.eval.evaluate import ClipScorer

        self.scorer = ClipScorer(clip_dir)
        self.batch = batch
        self.pending: list[tuple[dict, Image.Image, str]] = []

    def add(self, sample: dict, image: Image.Image, caption: str) -> list[tuple[dict, float]]:
        self.pending.append((sample, image, caption))
        return self.flush() if len(self.pending) >= self.batch else []

    def flush(self) -> list[tuple[dict, float]]:
        if not self.pending:
            return []
        scores = self.scorer.scores([p[1] for p in self.pending], [p[2] for p in self.pending])
        out = [(p[0], s) for p, s in zip(self.pending, scores)]
        self.pending = []
        return out


# ------------------------------------------------------------------------------------------------ main

def clean(inp_glob: str, out_dir: str | Path, clip_dir: str | Path | None = None, clip_min: float = 28.0,
          max_aspect: float = 3.0, hash_distance: int = 4, thumb_tolerance: int = 36, luma_tolerance: int = 24,
          per_shard: int = 1000, verbose: bool = True) -> dict:
    """Clean the shards; returns the report (also written to out_dir/report.json)."""
    import webdataset as wds

    t0 = time.time()
    shards = expand_shards(inp_glob)
    out = Path(out_dir)
    if out.is_file():
        raise NotADirectoryError(f"--out {out} is a file: give a folder for the clean shards")
    olds = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    there = {p.resolve() for p in out.iterdir()} if out.is_dir() else set()
    if there & {Path(s).resolve() for s in shards}:
        raise FileExistsError(f"--out {out} holds input shards: give another folder (cleaning writes shard-*.tar "
                              "there)")
    if olds and not (out / "report.json").is_file():  # shards an earlier clean did not write: someone's data
        raise FileExistsError(f"--out {out} already holds {len(olds)} shard-*.tar files that no earlier clean wrote "
                              "(no report.json): give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for old in olds:  # a re-run must not leave shards of a previous, larger output behind
        old.unlink()
    errors: list[dict] = []
    dropped: dict[str, list[str]] = {r: [] for r in REASONS}
    index = NearDuplicateIndex(hash_distance, thumb_tolerance, luma_tolerance)
    clip = _ClipBatcher(clip_dir) if clip_dir else None
    counts = {"total": 0, "kept": 0, "unchecked": 0, "checked_grammar": 0, "checked_clip": 0}
    clip_scores: list[float] = []
    files: list[str] = []

    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0, encoder=False, mtime=0,
                         post=files.append) as sink:
        def keep(sample: dict) -> None:
            sink.write({k: v for k, v in sample.items() if k != "__shard__"})
            counts["kept"] += 1

        def clip_results(results) -> None:
            for s, score in results:
                clip_scores.append(score)
                if score < clip_min:
                    dropped["clip_low"].append(s["__key__"])
                else:
                    keep(s)

        for sample in iter_samples(shards, errors):
            counts["total"] += 1
            key = sample["__key__"]
            ext, image = image_of(sample)
            if ext is None:
                dropped["no_image"].append(key)
                continue
            if image is None:
                dropped["broken_image"].append(key)
                continue
            caption = caption_of(sample)
            if caption is None:
                dropped["no_caption"].append(key)
                continue
            w, h = image.size
            if max(w, h) > max_aspect * min(w, h):
                dropped["aspect_ratio"].append(key)
                continue
            hsh, th = phash(image), thumbnail(image)
            if index.find(image, hsh, th) is not None:
                dropped["duplicate"].append(key)
                continue
            verdict = grammar_check(image, caption)
            if verdict is False:
                dropped["caption_mismatch"].append(key)
                continue
            index.add(key, image, hsh, th)  # kept or pending CLIP: later copies of it are duplicates either way
            if verdict is True:
                counts["checked_grammar"] += 1
                keep(sample)
            elif clip is not None:
                counts["checked_clip"] += 1
                clip_results(clip.add(sample, image, caption))
            else:
                counts["unchecked"] += 1
                keep(sample)
        if clip is not None:
            clip_results(clip.flush())

    n_drop = {r: len(v) for r, v in dropped.items()}
    report = {
        "input": str(inp_glob), "output": str(out), "shards_in": len(shards), "shards_out": len(files),
        **counts, "dropped": sum(n_drop.values()), "dropped_by_reason": n_drop,
        "dropped_keys": {r: v for r, v in dropped.items() if v},
        "shard_errors": errors,
        "settings": {"max_aspect": max_aspect, "hash_distance": hash_distance, "thumb_tolerance": thumb_tolerance,
                     "luma_tolerance": luma_tolerance,
                     "clip_dir": str(clip_dir) if clip_dir else None, "clip_min": clip_min},
        "clip_score_mean": float(np.mean(clip_scores)) if clip_scores else None,
        "seconds": round(time.time() - t0, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if verbose:
        print(summary(report))
    return report


def summary(report: dict) -> str:
    """The report in one line: kept, dropped by reason, damaged shards, unchecked captions."""
    why = ", ".join(f"{r} {n}" for r, n in report["dropped_by_reason"].items() if n) or "nothing"
    errors = report["shard_errors"]
    names = ", ".join(Path(e["shard"]).name for e in errors[:3]) + (", …" if len(errors) > 3 else "")
    extra = f"; {len(errors)} damaged shard(s): {names} (report.json says why)" if errors else ""
    extra += f"; {report['unchecked']} kept unchecked (caption outside the grammar)" if report["unchecked"] else ""
    return (f"cleaned {report['total']} samples from {report['shards_in']} shard(s): kept {report['kept']}, dropped "
            f"{report['dropped']} ({why}){extra} -> {report['output']}")


def main(inp_glob: str, out_dir: str, clip_dir: str | None = None, clip_min: float = 28.0, **kw) -> int:
    """Entry of `fluxtrain data clean --in GLOB --out DIR`; 0 on success, 2 if no shard matches."""
    import sys

    try:
        report = clean(inp_glob, out_dir, clip_dir=clip_dir, clip_min=clip_min, verbose=False, **kw)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError) as err:
        print(f"fluxtrain: error: {err}", file=sys.stderr)
        return 2
    if report["total"] == 0 and report["shard_errors"]:  # not a clean set: nothing could be read
        print(f"fluxtrain: error: no sample could be read from {inp_glob}: all {report['shards_in']} shard(s) are "
              f"damaged or not tar files ({Path(out_dir) / 'report.json'} lists why)", file=sys.stderr)
        return 2
    print(summary(report))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m fluxtrain.data.clean", description=__doc__.split("\n")[0])
    ap.add_argument("--in", dest="inp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clip", default=None, help="local CLIP model folder, for captions outside the grammar")
    ap.add_argument("--clip-min", type=float, default=28.0)
    ap.add_argument("--max-aspect", type=float, default=3.0)
    a = ap.parse_args()
    raise SystemExit(main(a.inp, a.out, a.clip, a.clip_min, max_aspect=a.max_aspect))
