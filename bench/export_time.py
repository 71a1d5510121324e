"""Time of `fluxtrain export` from a DCP checkpoint (issue #4, item 5: ≤ 90 s for FLUX.1-dev, 11.9 B parameters).

Writes a checkpoint of random weights of a preset as the trainer saves it (fp32, "model." keys) — or takes an
existing one with --checkpoint — then runs the real command once per format in a fresh process, cold (the
checkpoint's pages are dropped from the page cache first, unless --warm), and prints JSON lines: seconds, GB
written, the export process's peak RSS. Each export is deleted once measured, the generated checkpoint at the end
(--keep keeps both).

    python bench/export_time.py --preset tiny --work /tmp/xb --out /tmp/xb-out
    python bench/export_time.py --preset flux-dev --num-layers 2 --num-single-layers 4 --work /tmp/xb --out /tmp/xb-out
    # FLUX.1-dev on a 64 GiB disk + 128 GiB RAM host: checkpoint (47.6 GB) on disk, exports (23.8 GB) in RAM
    python bench/export_time.py --preset flux-dev --work /tmp/xb --out /dev/shm/xb

The checkpoint is written by this one process holding a few tensors at a time: its DCP save planner makes each
tensor (seeded by name) only when the writer asks for it. A trainer's checkpoint splits each tensor between the
ranks' files; this one keeps tensors whole (DCP reads both the same way, one read per stored piece).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluxtrain import config as C  # noqa: E402
from fluxtrain.export import run_config_of  # noqa: E402
from fluxtrain.models.flux import build_transformer, write_config  # noqa: E402
from fluxtrain.models.presets import transformer_kwargs  # noqa: E402
from fluxtrain.models.setup import model_kwargs  # noqa: E402

GB = 1e9


class _RandomWeights(DefaultSavePlanner):
    """The state dict holds meta tensors; each is made (N(0, 0.02), seeded by its name) when the writer resolves it,
    and dropped once written."""

    def resolve_data(self, write_item):
        meta = super().resolve_data(write_item)
        g = torch.Generator().manual_seed(zlib.crc32(write_item.index.fqn.encode()))
        return torch.empty(meta.shape, dtype=meta.dtype).normal_(0, 0.02, generator=g)


def _free_gb(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / GB


def _size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GB


def _emit(**row) -> None:
    print(json.dumps(row), flush=True)


def make_checkpoint(kw: dict, run: Path, shape_named_by: str | None, writers: int) -> Path:
    """A run dir (config.toml + checkpoints/step-00000001) whose checkpoint holds random weights of shape `kw`."""
    over = ["--train.output_dir", str(run)]
    if shape_named_by:
        over += ["--model.preset", shape_named_by]
    else:  # a shape that is no preset: as a pretrained folder's config, weights not loaded from it
        write_config(kw, run / "shape" / "transformer")
        over += ["--model.pretrained", str(run / "shape"), "--model.load_transformer", "false"]
    run.mkdir(parents=True, exist_ok=True)
    C.save(C.load(None, over), run / "config.toml")
    ckpt = run / "checkpoints" / "step-00000001"
    state = {"model": build_transformer(kw, "meta").state_dict()}
    dcp.save(state, storage_writer=FileSystemWriter(str(ckpt), thread_count=writers), planner=_RandomWeights(),
             no_dist=True)
    return ckpt


def drop_cache(folder: Path) -> None:
    """Flush the files and drop their pages, so that the export reads them from disk."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# `python -m fluxtrain` that also reports its own peak RSS (VmHWM: the rusage of a child started by vfork counts the
# parent's peak too, and this parent held a checkpoint's worth of tensors)
_CHILD = """import sys
from fluxtrain.cli import main
rc = main(sys.argv[2:])
open(sys.argv[1], "w").write(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))
sys.exit(rc)"""


def time_export(ckpt: Path, fmt: str, dest: Path, dtype: str, threads: int | None) -> dict:
    hwm = dest.parent / f".{fmt}-vmhwm"
    cmd = [sys.executable, "-c", _CHILD, str(hwm), "export", "--checkpoint", str(ckpt), "--format", fmt,
           "--out", str(dest), "--dtype", dtype] + (["--threads", str(threads)] if threads else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"export {fmt} failed: {' '.join(cmd)}")
    peak_kb = int(hwm.read_text())
    hwm.unlink()
    return {"event": "export", "format": fmt, "dtype": dtype, "threads": threads, "seconds": round(seconds, 2),
            "gb_written": round(_size_gb(dest), 3), "peak_rss_gb": round(peak_kb * 1024 / GB, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--num-layers", type=int, help="double blocks, overriding the preset's (a mid-size shape)")
    ap.add_argument("--num-single-layers", type=int, help="single blocks, overriding the preset's")
    ap.add_argument("--work", type=Path, help="run dir for the generated checkpoint (fp32: 4 bytes a parameter)")
    ap.add_argument("--checkpoint", type=Path, help="time an existing run's checkpoints/step-N instead")
    ap.add_argument("--out", type=Path, required=True, help="exports go here, each deleted once measured")
    ap.add_argument("--formats", default="diffusers,bfl")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", default="", help="export --threads, or several (4,8): one export of each format "
                                                  "each (default: the command's)")
    ap.add_argument("--writers", type=int, default=8, help="files (and threads) writing the generated checkpoint")
    ap.add_argument("--warm", action="store_true", help="leave the checkpoint in the page cache")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and the exports")
    a = ap.parse_args()
    if (a.work is None) == (a.checkpoint is None):
        ap.error("give --work (generate a checkpoint there) or --checkpoint (an existing one)")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    custom = a.num_layers is not None or a.num_single_layers is not None
    if a.checkpoint:
        kw = model_kwargs(run_config_of(a.checkpoint))
    else:
        kw = transformer_kwargs(a.preset)
        kw.update({k: v for k, v in (("num_layers", a.num_layers), ("num_single_layers", a.num_single_layers))
                   if v is not None})
    numel = sum(p.numel() for p in build_transformer(kw, "meta").parameters())
    need_ckpt = 0 if a.checkpoint else numel * 4 / GB
    need_out = numel * (2 if a.dtype == "bf16" else 4) / GB  # one export at a time
    work = a.work or a.checkpoint
    free = {str(work): _free_gb(work), str(a.out): _free_gb(a.out)}
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    _emit(event="preflight", params=numel, checkpoint_gb=round(need_ckpt, 2), export_gb=round(need_out, 2),
          free_gb={k: round(v, 1) for k, v in free.items()}, ram_gb=round(mem, 1), cpus=os.cpu_count())
    same_fs = os.stat(work).st_dev == os.stat(a.out).st_dev
    short = [(str(work), need_ckpt + (need_out if same_fs else 0))] + ([] if same_fs else [(str(a.out), need_out)])
    for path, need in short:
        if free[path] < need * 1.02:
            raise SystemExit(f"{path}: {free[path]:.1f} GB free, {need:.1f} GB needed; give --work/--out on other "
                             "file systems (e.g. --out /dev/shm/…: exports then take RAM)")

    ckpt = a.checkpoint
    if ckpt is None:
        t0 = time.perf_counter()
        ckpt = make_checkpoint(kw, a.work, None if custom else a.preset, a.writers)
        _emit(event="checkpoint", seconds=round(time.perf_counter() - t0, 2), gb=round(_size_gb(ckpt), 3))
    try:
        for threads in [int(t) for t in a.threads.split(",") if t] or [None]:
            for fmt in a.formats.split(","):
                if not a.warm:
                    drop_cache(ckpt)
                dest = a.out / fmt
                try:
                    _emit(**time_export(ckpt, fmt, dest, a.dtype, threads))
                finally:
                    if not a.keep:
                        shutil.rmtree(dest, ignore_errors=True)
    finally:
        if not a.keep:
            with contextlib.suppress(OSError):
                a.out.rmdir()  # if this bench made it and left it empty
            if a.checkpoint is None:
                shutil.rmtree(a.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
