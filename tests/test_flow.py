import pytest
import torch
from diffusers import FluxPipeline

from fluxtrain import flow


def test_pack_matches_diffusers_and_round_trips():
    x = torch.randn(2, 16, 12, 8)
    packed = flow.pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 12, 8))
    assert torch.equal(flow.unpack(packed, 12, 8), x)
    # diffusers' unpack takes pixel sizes and the VAE factor
    assert torch.equal(FluxPipeline._unpack_latents(packed, 12 * 8, 8 * 8, 8), x)


def test_image_ids_match_diffusers():
    ours = flow.image_ids(12, 8)
    theirs = FluxPipeline._prepare_latent_image_ids(1, 6, 4, "cpu", torch.float32)
    assert torch.equal(ours, theirs)
    assert torch.equal(flow.text_ids(5), torch.zeros(5, 3))


def test_target_and_interpolation():
    x0, eps = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xt = flow.noisy_input(x0, eps, sigma)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.5 * (x0[1] + eps[1]))
    # the velocity is d x_t / d sigma
    assert torch.allclose(flow.target(x0, eps), (flow.noisy_input(x0, eps, sigma + 0.1) - xt) / 0.1, atol=1e-5)
    assert flow.flow_loss(flow.target(x0, eps), flow.target(x0, eps), sigma) == 0


def test_sigma_sampling_and_shift():
    g = torch.Generator().manual_seed(0)
    s = flow.sample_sigmas(4096, 4096, "logit_normal", generator=g, shift=False)
    assert 0 < s.min() and s.max() < 1 and abs(float(s.median()) - 0.5) < 0.05
    g = torch.Generator().manual_seed(0)
    shifted = flow.sample_sigmas(4096, 4096, "logit_normal", generator=g, shift=True)
    assert float(shifted.median()) > 0.7  # 1024² images get noisier timesteps (mu = 1.15)
    assert abs(flow.shift_mu(256) - 0.5) < 1e-9 and abs(flow.shift_mu(4096) - 1.15) < 1e-9


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_sigmas_from_draws_match_diffusers_densities(scheme):
    """The trainer's vectorised timestep maths gives diffusers' compute_density_for_timestep_sampling on the same
    draws (a normal for logit-normal, a uniform for the others)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    kw = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ref = compute_density_for_timestep_sampling(scheme, 1000, generator=torch.Generator().manual_seed(0), **kw)
    z = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    ours = flow.sigmas_from_draws(z, u, 4096, scheme, shift=False, **kw)
    torch.testing.assert_close(ours, ref.clamp(1e-5, 1 - 1e-5), atol=1e-6, rtol=0)
    shifted = flow.sigmas_from_draws(z, u, 4096, scheme, shift=True, **kw)
    torch.testing.assert_close(shifted, flow.time_shift(flow.shift_mu(4096), ours))


def test_true_cfg_combines_the_branches_of_one_batch():
    """cfg_scale 0 keeps only the unconditional branch: the result must equal sampling the negative prompt alone;
    scale 1 is plain sampling of the prompt (no negative pass)."""
    from fluxtrain.models.flux import build_transformer
    from fluxtrain.models.presets import transformer_kwargs

    torch.manual_seed(0)
    model = build_transformer(transformer_kwargs("tiny"), device="cpu").eval()
    seq, pooled = torch.randn(2, 8, 64), torch.randn(2, 64)
    neg = (torch.randn(1, 8, 64), torch.randn(1, 64))
    noise = torch.randn(2, 16, 8, 8)
    kw = dict(steps=3, guidance=1.0, noise=noise)
    with torch.no_grad():
        only_neg = flow.sample(model, neg[0].expand(2, -1, -1), neg[1].expand(2, -1), 8, 8, **kw)
        zero = flow.sample(model, seq, pooled, 8, 8, neg=neg, cfg_scale=0.0, **kw)
        plain = flow.sample(model, seq, pooled, 8, 8, **kw)
        one = flow.sample(model, seq, pooled, 8, 8, neg=neg, cfg_scale=1.0, **kw)
        four = flow.sample(model, seq, pooled, 8, 8, neg=neg, cfg_scale=4.0, **kw)
    torch.testing.assert_close(zero, only_neg, atol=1e-5, rtol=1e-5)
    assert torch.equal(one, plain)
    assert not torch.allclose(four, plain, atol=1e-3)


def test_cfg_interval_guides_only_the_steps_inside_it():
    """An interval holding every σ is plain CFG, an interval holding none is no CFG, and one in between differs from
    both: the guided steps are the ones whose σ is in [lo, hi]."""
    from fluxtrain.models.flux import build_transformer
    from fluxtrain.models.presets import transformer_kwargs

    torch.manual_seed(0)
    model = build_transformer(transformer_kwargs("tiny"), device="cpu").eval()
    seq, pooled = torch.randn(2, 8, 64), torch.randn(2, 64)
    neg = (torch.randn(1, 8, 64), torch.randn(1, 64))
    kw = dict(steps=4, guidance=1.0, noise=torch.randn(2, 16, 8, 8), neg=neg, cfg_scale=4.0)
    with torch.no_grad():
        full = flow.sample(model, seq, pooled, 8, 8, **kw)
        every = flow.sample(model, seq, pooled, 8, 8, cfg_interval=(0.0, 1.0), **kw)
        none = flow.sample(model, seq, pooled, 8, 8, cfg_interval=(0.0, 0.01), **kw)
        plain = flow.sample(model, seq, pooled, 8, 8, **{**kw, "cfg_scale": 1.0})
        # σ of the 4 steps (shifted): the first ~1.0, the last ~0.3; guide the late ones only
        late = flow.sample(model, seq, pooled, 8, 8, cfg_interval=(0.0, 0.8), **kw)
    torch.testing.assert_close(every, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(none, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(late, full, atol=1e-3) and not torch.allclose(late, plain, atol=1e-3)
