"""Data throughput: samples/s of the streaming WebDataset loader (PNG decode + resize/crop, N DataLoader workers)
and of the latent cache loader (safetensors reads), printed as a table. CPU only; nothing is trained.

    python bench/data_throughput.py                      # synthetic 64 px shards, workers 0,1,2; fake caches
    python bench/data_throughput.py --size 512 --resolution 512 --num 512 --workers 0,2,4
    python bench/data_throughput.py --shards '/data/shard-*.tar' --resolution 1024 --cache /data/cache

The fake caches hold random bf16 tensors of the tiny model's shapes and of FLUX.1-dev's (latents 16×r/8×r/8,
T5 512×4096, CLIP 768): what a cache read costs, not what it took to make. They are read right after being
written, so from the page cache: a cold disk is slower.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxtrain import config as C  # noqa: E402
from fluxtrain.data.cache import FORMAT, CacheBatches, read_manifest  # noqa: E402
from fluxtrain.data.webdataset import build_webdataset_loader  # noqa: E402


def time_batches(loader, batches: int, warmup: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s over `batches` batches after `warmup`)."""
    t0 = time.perf_counter()
    b = next(loader)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        next(loader)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        b = next(loader)
        n += len(b["captions"])
        for v in b.values():  # cache tensors are lazy mmap views: copy them, as a host→GPU copy would read them
            if isinstance(v, torch.Tensor):
                v.clone()
    dt = time.perf_counter() - t0
    if hasattr(loader, "close"):
        loader.close()
    return first, n / dt


def fake_cache(root: Path, n: int, per_shard: int, lat: tuple[int, int, int], seq: tuple[int, int], pooled: int):
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    g = torch.Generator().manual_seed(0)
    for j, start in enumerate(range(0, n, per_shard)):
        k = min(per_shard, n - start)
        t = {"latent_mean": torch.randn(k, *lat, generator=g).bfloat16(),
             "latent_std": torch.rand(k, *lat, generator=g).bfloat16(),
             "seq": torch.randn(k, *seq, generator=g).bfloat16(),
             "pooled": torch.randn(k, pooled, generator=g).bfloat16()}
        name = f"shard-{j:06d}.safetensors"
        captions = json.dumps([f"c{start + i}" for i in range(k)])
        save_file(t, str(root / name), metadata={"count": str(k), "captions": captions})
        shards.append({"file": name, "count": k, "source": "fake"})
    manifest = {"format": FORMAT, "count": n, "shards": shards, "resolution": lat[1] * 8, "max_text_tokens": seq[0]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=None, help="existing shards (glob/brace/@list); default: write synthetic ones")
    ap.add_argument("--num", type=int, default=2000, help="synthetic samples to write")
    ap.add_argument("--size", type=int, default=64, help="synthetic image size")
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cache", default=None, help="an existing cache directory to read as well")
    ap.add_argument("--cache-num", type=int, default=256, help="samples in each fake cache")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads in this process (0: default)")
    ap.add_argument("--flux-resolution", type=int, default=512, help="resolution of the FLUX.1-dev-shaped fake cache")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)  # on an oversubscribed machine, intra-op threads make copies slower

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = a.shards
        if shards is None:
            from fluxtrain.data.synthetic import write_shards

            t0 = time.perf_counter()
            write_shards(tmp / "shards", a.num, size=a.size, per_shard=a.per_shard)
            print(f"wrote {a.num} synthetic {a.size}px samples in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            shards = str(tmp / "shards" / "shard-*.tar")
        for w in [int(x) for x in a.workers.split(",")]:
            cfg = C.from_dict({"data": {"source": "webdataset", "path": shards, "resolution": a.resolution,
                                        "num_workers": w, "shuffle_buffer": a.shuffle_buffer},
                               "train": {"batch_size": a.batch_size}})
            first, sps = time_batches(build_webdataset_loader(cfg, 0, 1), a.batches, a.warmup)
            rows.append((f"shards → {a.resolution}px pixels", str(w), first, sps))

        r = a.flux_resolution // 8
        fakes = [("cache, tiny shapes", (16, a.resolution // 4, a.resolution // 4), (512, 64), 64),
                 (f"cache, FLUX.1-dev shapes @{a.flux_resolution}px", (16, r, r), (512, 4096), 768)]
        for label, lat, seq, pooled in fakes:
            root = fake_cache(tmp / label.split(",")[1].strip().replace(" ", "_").replace("@", ""), a.cache_num,
                              min(a.cache_num, 128), lat, seq, pooled)
            mb = sum(p.stat().st_size for p in root.glob("*.safetensors")) / a.cache_num / 2**20
            for shuffle in (False, True):
                _, m = read_manifest(root)
                loader = CacheBatches(root, m, a.batch_size, 0, 1, shuffle=shuffle)
                first, sps = time_batches(loader, a.batches, a.warmup)
                rows.append((f"{label} ({mb:.2f} MiB/sample){', shuffled' if shuffle else ''}", "-", first, sps))
        if a.cache:
            root, m = read_manifest(a.cache)
            first, sps = time_batches(CacheBatches(root, m, a.batch_size, 0, 1), a.batches, a.warmup)
            rows.append((f"cache {a.cache}", "-", first, sps))

    width = max(len(r[0]) for r in rows)
    print(f"{'source':<{width}}  workers  first batch (s)  samples/s")
    for name, w, first, sps in rows:
        print(f"{name:<{width}}  {w:>7}  {first:>15.2f}  {sps:>9.0f}")
    print(f"(batch {a.batch_size}, {a.batches} batches timed after {a.warmup}; "
          f"torch threads {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
