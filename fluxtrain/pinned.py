"""Page-locked host memory of exactly the bytes asked for (optimizer offload's moments, the checkpoint stager)."""

from __future__ import annotations

import weakref

import numpy as np
import torch


def pinned_zeros(n: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """n zeros in host memory, page-locked when `pin`, taking exactly their bytes. torch's pinned allocator rounds
    every block up to a power of two: 12B's fp32 optimizer-offload moments, one buffer per block, took 152 GiB of
    page-locked memory for 89 GiB, and the host killed the run (bench/RESULTS.md, thirteenth session). So the memory
    is allocated pageable and page-locked with cudaHostRegister; it is unregistered when the last view of it goes."""
    if not pin:
        return torch.zeros(n, dtype=dtype)
    page, nbytes = 4096, n * dtype.itemsize
    base = np.zeros(nbytes + page, dtype=np.uint8)  # calloc: zero pages, touched when registered
    off = -base.ctypes.data % page  # page-aligned start, as registration wants
    host = torch.from_numpy(base[off:off + nbytes])  # keeps `base` alive through the view
    cudart, ptr = torch.cuda.cudart(), host.data_ptr()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"could not page-lock {nbytes / 2**30:.1f} GiB of host memory (CUDA error {int(err)}): "
                           "`fluxtrain plan --host-mem-gib N` shows what a node must hold; lower it with "
                           "--parallel.optimizer_offload_dtype bf16 or --checkpoint.async_save false")
    # numpy clears weak references before it frees the data: unregistered while still mapped
    weakref.finalize(base, cudart.cudaHostUnregister, ptr)
    return host.view(dtype)
