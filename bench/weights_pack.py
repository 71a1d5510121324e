"""A model folder in fewer bytes, for carrying it to a GPU machine (64 MiB a call, with the wheels and the repo).

    python bench/weights_pack.py pack /work/.device/N/export .chain/base.pack   # here
    python3 bench/weights_pack.py unpack .chain/base.pack /tmp/warm             # there: the same bytes

bf16 weights barely compress as they are (zlib: 79% of the deep preset's 54.7 MB transformer), but their high bytes
(sign and 7 exponent bits) do: split into a high-byte and a low-byte plane, the high plane compresses to ~36% with
lzma and the low one (mantissas) not at all. The pack is a tar: each safetensors file whose tensors are all bf16 is
stored as its header, its high plane (lzma) and its low plane; every other file as it is. Unpacking restores every
file byte for byte. The twenty-first session's deep base (82.8% complex) is 53.9 MiB as an export, 36 MiB packed:
with the wheels (9 MiB) and the tracked repo (12 MiB) it fits one call's 64 MiB.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

PARTS = (".head", ".hi.xz", ".lo")


def _bf16_body(data: bytes) -> int | None:
    """Where the tensor bytes of a safetensors file begin, if all its tensors are bf16; else None."""
    if len(data) < 8:
        return None
    n = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        return None
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return 8 + n if dtypes == {"BF16"} and (len(data) - 8 - n) % 2 == 0 else None


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def pack(src: Path, out: Path) -> dict:
    """Every file under `src` into the tar `out`; returns {"files", "split", "bytes_in", "bytes_out"}."""
    if not src.is_dir():
        raise SystemExit(f"{src} is not a folder: give an exported model folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    split = bytes_in = 0
    with tarfile.open(out, "w") as tar:
        for p in files:
            rel, data = p.relative_to(src).as_posix(), p.read_bytes()
            bytes_in += len(data)
            start = _bf16_body(data) if p.suffix == ".safetensors" else None
            if start is None:
                _add(tar, rel, data)
                continue
            body = np.frombuffer(data, dtype=np.uint8, offset=start)
            _add(tar, rel + PARTS[0], data[:start])
            _add(tar, rel + PARTS[1], lzma.compress(body[1::2].tobytes(), preset=6))
            _add(tar, rel + PARTS[2], body[0::2].tobytes())
            split += 1
    return {"files": len(files), "split": split, "bytes_in": bytes_in, "bytes_out": out.stat().st_size}


def unpack(pack_file: Path, dst: Path) -> int:
    """The tar `pack_file` back into the folder `dst`; returns the number of files written."""
    if not pack_file.is_file():
        raise SystemExit(f"{pack_file} does not exist: make it with `weights_pack.py pack FOLDER {pack_file}`")
    members: dict[str, bytes] = {}
    with tarfile.open(pack_file) as tar:
        for m in tar.getmembers():
            if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise SystemExit(f"{pack_file}: member {m.name!r} is not a plain relative file: not a weights pack")
            members[m.name] = tar.extractfile(m).read()
    written = 0
    for name, data in members.items():
        if name.endswith(PARTS[1]) or name.endswith(PARTS[2]):
            continue
        if name.endswith(PARTS[0]):
            base = name[: -len(PARTS[0])]
            hi, lo = lzma.decompress(members[base + PARTS[1]]), members[base + PARTS[2]]
            if len(hi) != len(lo):
                raise SystemExit(f"{pack_file}: {base}'s byte planes differ in length: the pack is damaged")
            body = np.empty(2 * len(lo), dtype=np.uint8)
            body[0::2], body[1::2] = np.frombuffer(lo, np.uint8), np.frombuffer(hi, np.uint8)
            name, data = base, data + body.tobytes()
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes(data)
        written += 1
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="FOLDER → PACK")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    u = sub.add_parser("unpack", help="PACK → FOLDER")
    u.add_argument("pack", type=Path)
    u.add_argument("dst", type=Path)
    a = ap.parse_args()
    if a.cmd == "pack":
        r = pack(a.src, a.out)
        print(f"{a.src} → {a.out}: {r['files']} files ({r['split']} split), {r['bytes_in'] / 2**20:.1f} → "
              f"{r['bytes_out'] / 2**20:.1f} MiB")
    else:
        print(f"{a.pack} → {a.dst}: {unpack(a.pack, a.dst)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
