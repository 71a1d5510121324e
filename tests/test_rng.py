"""The counter-based per-sample draws: splitmix64 on int64 tensors (checked against Python's exact integers),
independent of how many values are drawn, and distributed as they should be."""

import math

import torch

from fluxtrain import rng

M = (1 << 64) - 1
G = 0x9E3779B97F4A7C15


def _mix(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


def _uniform_ref(seed: int, i: int, stream: int, j: int) -> float:
    key = _mix((_mix((_mix((seed + G) & M) + i) & M) + stream) & M)
    return ((_mix((key + (j + 1) * G) & M) >> 11) + 0.5) * 2.0**-53


def test_uniform_is_splitmix64_exactly():
    idx = torch.tensor([0, 1, 7, 123_456_789, 2**40])
    for seed in (0, 1, 2**63 + 5):
        got = rng.uniform(seed, idx, 3, 6)
        ref = torch.tensor([[_uniform_ref(seed % 2**64, int(i), 3, j) for j in range(6)] for i in idx],
                           dtype=torch.float64)
        assert torch.equal(got, ref)


def test_draws_do_not_depend_on_how_many_are_drawn_or_on_the_batch():
    z = rng.normal(4, torch.tensor([9, 2]), 1, 100)
    assert torch.equal(rng.normal(4, torch.tensor([2]), 1, 10)[0], z[1, :10])
    assert not torch.equal(rng.normal(4, torch.tensor([2]), 0, 10)[0], z[1, :10])  # streams differ


def test_distributions():
    u = rng.uniform(3, torch.arange(100_000), 1, 1).float()
    h = torch.histc(u, 100, 0, 1)
    assert float(((h - 1000) ** 2 / 1000).sum()) < 150  # χ² with 99 dof: p ≈ 0.001
    z = rng.normal(1, torch.arange(20_000), 2, 50)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z ** 4).mean()) - 3) < 0.1  # Gaussian kurtosis
    assert abs(float((z[:, 1:] * z[:, :-1]).mean())) < 0.01 and abs(float((z[1:] * z[:-1]).mean())) < 0.01
    assert math.isfinite(float(z.abs().max()))
