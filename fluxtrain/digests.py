"""SHA-256 digests of a local checkpoint's files, so that a damaged file is found before it is loaded.

A truncated or deleted DCP file already fails the load, but a file with flipped or overwritten bytes of the same size
loads and trains on wrong weights without a word. After a save, each rank hashes the files it wrote (its
`__RANK_*.distcp`, `rank-RANK.json`, `rng-RANK.safetensors`; rank 0 also DCP's `.metadata`) and writes
`sha256-RANK.json` (name → [bytes, hex digest]), on the save's background thread. Loading checks them, the files
spread over the ranks. Object stores (s3://) are not hashed here: reading a checkpoint back from the store would
cost a download, and the store checks its own uploads.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PREFIX = "sha256-"
THREADS = 4  # files hashed at once when checking: a rank's share, or all of them for an export, in parallel


def _own_files(folder: Path, rank: int) -> list[Path]:
    own = sorted(folder.glob(f"__{rank}_*.distcp")) + [folder / f"rank-{rank}.json", folder / f"rng-{rank}.safetensors"]
    if rank == 0:
        own.append(folder / ".metadata")
    return [p for p in own if p.is_file()]


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in chunks, outside the GIL


def write(folder: str | Path, rank: int) -> int:
    """Hash the files this rank wrote into `folder`; returns the bytes hashed."""
    folder = Path(folder)
    entries = {p.name: [p.stat().st_size, _digest(p)] for p in _own_files(folder, rank)}
    (folder / f"{PREFIX}{rank}.json").write_text(json.dumps(entries, indent=0, sort_keys=True))
    return sum(size for size, _ in entries.values())


def listed(folder: str | Path) -> list[tuple[str, int, str]] | None:
    """Every file the digests name, as (name, bytes, hex) sorted by name; None for a checkpoint without digests (one
    written before they existed, or to an object store)."""
    folder = Path(folder)
    files = sorted(folder.glob(f"{PREFIX}*.json"))
    if not files:
        return None
    out = []
    for f in files:
        try:
            entries = json.loads(f.read_text())
            out += [(name, int(size), str(hexd)) for name, (size, hexd) in entries.items()]
        except (ValueError, TypeError, AttributeError):
            out.append((f.name, -1, "unreadable"))  # a damaged digest file is itself a finding
    return sorted(out)


def problem(folder: str | Path, entry: tuple[str, int, str]) -> str | None:
    """What is wrong with one listed file, as a phrase; None when it matches."""
    name, size, hexd = entry
    p = Path(folder) / name
    if hexd == "unreadable":
        return f"its digest file {name} cannot be read"
    if not p.is_file():
        return f"{name} is missing"
    if p.stat().st_size != size:
        return f"{name} has {p.stat().st_size} bytes, {size} when written"
    if _digest(p) != hexd:
        return f"{name} does not match the SHA-256 it was written with"
    return None


def first_bad(folder: str | Path, entries: list[tuple[str, int, str]], rank: int = 0, world: int = 1,
              threads: int = THREADS) -> int | None:
    """This rank's share of `entries` (every world-th, from rank) checked: the index of the first bad one, or None."""
    share = range(rank, len(entries), world)
    with ThreadPoolExecutor(max(1, min(threads, len(share)))) as pool:
        found = pool.map(lambda i: problem(folder, entries[i]) is not None, share)
        return next((i for i, bad in zip(share, found) if bad), None)


def main(argv: list[str]) -> int:
    """`fluxtrain verify PATH…`: check checkpoints against their digests before a resume, copy or deletion. A PATH is a
    step-N folder, or a run (or checkpoints) folder for all its complete checkpoints. Exit code 1 if any is damaged."""
    import argparse

    from fluxtrain.checkpoint import CheckpointError, DamagedCheckpoint, checkpoint_root, complete_checkpoints, verify
    from fluxtrain.config import ConfigError
    from fluxtrain.export import run_config_of

    ap = argparse.ArgumentParser(prog="fluxtrain verify", description=main.__doc__.split(": ", 1)[1])
    ap.add_argument("paths", nargs="+", metavar="PATH")
    a = ap.parse_args(argv)
    found: list = []
    for p in map(Path, a.paths):
        if (p / "COMPLETE").is_file() or (p / ".metadata").is_file():
            found.append(p)
        elif p.is_file():
            raise CheckpointError(f"{p} is a file: give a step-N folder, or a run or checkpoints folder")
        elif p.is_dir():
            steps = complete_checkpoints(p) or complete_checkpoints(checkpoint_root(p))
            if not steps:
                raise CheckpointError(f"{p} holds no complete checkpoint (step-N folder with its COMPLETE marker)")
            found += steps
        else:
            raise CheckpointError(f"{p} does not exist: give a step-N folder, or a run or checkpoints folder")
    count = {"intact": 0, "damaged": 0, "not checked": 0}
    for p in found:
        try:
            checked = verify(p)
            run_config_of(p)  # config.toml, which rank 0 adds as it publishes, after the digests: export needs it
        except (CheckpointError, ConfigError) as err:
            count["damaged"] += 1
            print(f"damaged      {f'{p}: {err.what}' if isinstance(err, DamagedCheckpoint) else err}")
            continue
        count["intact" if checked else "not checked"] += 1
        print(f"intact       {p}: {checked[0]} files, {checked[1] / 2**20:.1f} MiB" if checked else
              f"not checked  {p}: no digests (written before them, to an object store, or with checkpoint.digests = "
              "false)")
    print(f"{len(found)} checkpoints: " + ", ".join(f"{n} {k}" for k, n in count.items() if n))
    return 1 if count["damaged"] else 0
