"""Per-sample random draws, counter-based: value j of sample i in stream s is a hash of (seed, i, s, j).

A sample's noise, timestep and caption dropout are then the same whatever the world size, batch split or resume
point, and the uniform bits are the same on CPU and CUDA (integer ops; the Gaussian transform may differ in the
last float64 place). A batch is drawn in a few vectorised ops on the device that trains. A torch.Generator reseeded
per sample had the first property but cost ~70 µs of host time per sample on a GPU (9 ms a step at batch 128,
bench/RESULTS.md). The hash is splitmix64's finaliser on int64 tensors.
"""

from __future__ import annotations

import math

import torch


def _i64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _C1, _C2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _srl(x, 30)) * _C1
    x = (x ^ _srl(x, 27)) * _C2
    return x ^ _srl(x, 31)


def uniform(seed: int, indices: torch.Tensor, stream: int, n: int, device=None) -> torch.Tensor:
    """[len(indices), n] float64 in (0, 1)."""
    idx = indices.to(device=device, dtype=torch.int64).reshape(-1, 1)
    key = _mix(_mix(_mix(torch.full_like(idx, _i64(seed % (1 << 64))) + _GOLDEN) + idx) + stream)
    x = _mix(key + torch.arange(1, n + 1, dtype=torch.int64, device=idx.device) * _GOLDEN)
    return (_srl(x, 11).double() + 0.5) * 2.0**-53


def normal(seed: int, indices: torch.Tensor, stream: int, n: int, device=None) -> torch.Tensor:
    """[len(indices), n] float32 standard normal: Box–Muller on uniform draws 2j and 2j+1 (so the first n values
    don't depend on n)."""
    u = uniform(seed, indices, stream, 2 * n, device).view(-1, n, 2)
    return (torch.sqrt(-2.0 * torch.log(u[..., 0])) * torch.cos(2.0 * math.pi * u[..., 1])).float()
