"""The trainer's per-sample draws depend on (seed, sample index) only: how samples are split over ranks or batches
doesn't change them (what makes sharded, resharded and resumed runs comparable)."""

import torch

from fluxtrain import config as C
from fluxtrain.train import sample_noise


def test_a_samples_draws_do_not_depend_on_its_batch():
    tc = C.load(None, []).train
    a = sample_noise(torch.tensor([3, 7, 11]), 5, (4, 2, 2), 64, tc, 0.5)
    b = sample_noise(torch.tensor([11, 3]), 5, (4, 2, 2), 64, tc, 0.5)
    for x, y in zip(a, b):
        assert torch.equal(x[[2, 0]], y)
    c = sample_noise(torch.tensor([3, 7, 11]), 6, (4, 2, 2), 64, tc, 0.5)  # another seed, other draws
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert not torch.equal(a[0], a[1])  # posterior and flow noise are separate draws


def test_draws_have_the_configured_distributions():
    tc = C.load(None, ["--train.timestep_sampling", "uniform", "--train.shift", "false"]).train
    post, eps, sigma, drop = sample_noise(torch.arange(4000), 0, (4,), 64, tc, 0.1)
    assert post.shape == eps.shape == (4000, 4) and abs(float(eps.std()) - 1) < 0.03 and abs(float(post.mean())) < 0.03
    assert 0 < float(sigma.min()) and float(sigma.max()) < 1 and abs(float(sigma.mean()) - 0.5) < 0.02
    assert drop.dtype == torch.bool and abs(float(drop.float().mean()) - 0.1) < 0.02
