"""Frozen text encoders (CLIP pooled + T5 sequence) and the VAE, loaded from a diffusers-layout FLUX folder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast


class TextEncoders(torch.nn.Module):
    """prompt → (T5 sequence embeddings [B, L, D], CLIP pooled vector [B, P]), as FluxPipeline.encode_prompt."""

    def __init__(self, folder: str | Path, max_tokens: int = 512, dtype: torch.dtype = torch.float32):
        super().__init__()
        folder = Path(folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.tokenizer_2 = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
        self.clip = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype).eval().requires_grad_(False)
        self.t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype).eval().requires_grad_(False)
        self.max_tokens = max_tokens

    @property
    def device(self) -> torch.device:
        return next(self.t5.parameters()).device

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(self.device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                  return_tensors="pt").input_ids.to(self.device)
        seq = self.t5(t5_ids, output_hidden_states=False)[0]
        return seq, pooled


class Autoencoder(torch.nn.Module):
    """The frozen VAE, with FLUX's latent normalisation ((z - shift) · scale)."""

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vae = AutoencoderKL.from_pretrained(Path(folder) / "vae", torch_dtype=dtype).eval().requires_grad_(False)
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(self.vae.config.shift_factor or 0.0)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std for images in [-1, 1], normalised like training latents (for the cache)."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (dist.mean - self.shift) * self.scale, dist.std * self.scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = self.moments(images)
        return sample_posterior(mean, std, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scale + self.shift
        return self.vae.decode(z).sample.clamp(-1, 1)


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise
