"""FLUX's rectified-flow objective: latent packing, position ids, timesteps, targets, loss, and the sampler."""

from __future__ import annotations

import math

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H/2·W/2, 4C]: 2×2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` for a latent grid of h × w."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids of the packed image tokens: (0, row, col), for a latent grid of h × w."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(length, 3, device=device, dtype=dtype)


def shift_mu(image_seq_len: int, base_len=256, max_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """FLUX's resolution-dependent shift (diffusers' calculate_shift with FLUX.1-dev's scheduler defaults)."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sample_sigmas(batch: int, image_seq_len: int, scheme: str, *, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                  shift=True, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """σ ∈ (0, 1) per sample: 0 is data, 1 is noise."""
    z = torch.randn(batch, generator=generator)
    u = torch.rand(batch, generator=generator)
    return sigmas_from_draws(z, u, image_seq_len, scheme, logit_mean=logit_mean, logit_std=logit_std,
                             mode_scale=mode_scale, shift=shift).to(device)


def sigmas_from_draws(z: torch.Tensor, u: torch.Tensor, image_seq_len: int, scheme: str, *, logit_mean=0.0,
                      logit_std=1.0, mode_scale=1.29, shift=True) -> torch.Tensor:
    """σ from one standard-normal draw `z` and one uniform draw `u` per sample: the densities of diffusers'
    compute_density_for_timestep_sampling (SD3's logit-normal and mode schemes), vectorised over draws that the
    trainer makes per sample."""
    if scheme == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * z)
    elif scheme == "mode":
        t = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        t = u
    t = t.clamp(1e-5, 1 - 1e-5)
    return time_shift(shift_mu(image_seq_len), t) if shift else t


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·ε (σ broadcast over all but the batch dimension)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity FLUX predicts: ε − x0."""
    return noise - x0


def flow_loss(pred: torch.Tensor, tgt: torch.Tensor, sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Per-sample mean squared error, weighted as SD3/FLUX training scripts do, averaged over the batch."""
    w = compute_loss_weighting_for_sd3(weighting, sigma.float())
    per = ((pred.float() - tgt.float()) ** 2).flatten(1).mean(1)
    return (w * per).mean()


def transformer_inputs(x_t_packed, sigma, seq, pooled, lat_h, lat_w, guidance: float | None):
    """Keyword arguments of FluxTransformer2DModel.forward (timestep in [0, 1], as diffusers expects)."""
    dev, dt = x_t_packed.device, x_t_packed.dtype
    g = None if guidance is None else torch.full((x_t_packed.shape[0],), guidance, device=dev, dtype=torch.float32)
    return dict(
        hidden_states=x_t_packed,
        encoder_hidden_states=seq.to(dt),
        pooled_projections=pooled.to(dt),
        timestep=sigma.to(dev, torch.float32),
        img_ids=image_ids(lat_h, lat_w, device=dev),
        txt_ids=text_ids(seq.shape[1], device=dev),
        guidance=g,
        return_dict=False,
    )


@torch.no_grad()
def sample(transformer, seq, pooled, lat_h, lat_w, *, steps=20, guidance: float | None = 3.5,
           generator: torch.Generator | None = None, neg=None, cfg_scale: float = 1.0,
           noise: torch.Tensor | None = None, cfg_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Euler sampling with diffusers' FlowMatchEulerDiscreteScheduler and FLUX's shifted schedule.

    Returns latents [B, C, lat_h, lat_w]. `neg` (seq, pooled) with cfg_scale > 1 gives true classifier-free guidance
    (both branches in one batch). `cfg_interval` (lo, hi): guide only the steps whose σ (shifted; 1 is noise) lies
    in [lo, hi], the others take the prompt's branch alone (guidance in a limited interval, Kynkäänniemi et al.
    2024). `noise` [B, C, lat_h, lat_w] is the starting point (default: drawn from generator).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    b = seq.shape[0]
    channels = transformer.config.in_channels // 4
    dev = seq.device
    x = noise if noise is not None else torch.randn(b, channels, lat_h, lat_w, generator=generator, device="cpu")
    x = pack(x.to(dev))
    cfg = neg is not None and cfg_scale != 1.0
    lo, hi = cfg_interval if cfg_interval is not None else (0.0, 1.0)
    if cfg:
        both = torch.cat([seq, neg[0].expand_as(seq)]), torch.cat([pooled, neg[1].expand_as(pooled)])
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    import numpy as np

    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(x.shape[1]), device=dev)
    dtype = next(transformer.parameters()).dtype
    for t in sched.timesteps:
        guided = cfg and lo <= float(t) / 1000 <= hi
        xin, (s, p) = (torch.cat([x, x]), both) if guided else (x, (seq, pooled))
        sigma = (t / 1000).expand(xin.shape[0])
        pred = transformer(**transformer_inputs(xin.to(dtype), sigma, s, p, lat_h, lat_w, guidance))[0]
        if guided:
            pred_c, pred_n = pred.chunk(2)
            pred = pred_n + cfg_scale * (pred_c - pred_n)
        x = sched.step(pred.float(), t, x, return_dict=False)[0]
    return unpack(x, lat_h, lat_w)
