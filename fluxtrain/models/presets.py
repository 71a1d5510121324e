"""Model shapes: the transformer's constructor arguments per preset (diffusers' FluxTransformer2DModel signature)."""

from __future__ import annotations

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# The embedded default: 16 latent channels like FLUX's VAE, width 128, 2 double + 4 single blocks.
TINY = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)

PRESETS: dict[str, dict] = {
    "flux-dev": FLUX_DEV,
    # schnell is the same network without the guidance embedding (timestep-distilled).
    "flux-schnell": {**FLUX_DEV, "guidance_embeds": False},
    "tiny": TINY,
    # tiny's encoders and VAE (text width 64) under a wider, deeper transformer (19M): for GPU experiments such as
    # the adherence ablation, where a step of either is launch-bound and the larger one learns more per sample.
    "small": {**TINY, "num_layers": 4, "num_single_layers": 8, "attention_head_dim": 64, "axes_dims_rope": (16, 24, 24)},
    # small at 1.5× the width (6 heads of 64, 40.0M): the adherence benchmark's small model plateaus near 80% of complex
    # prompts after 24,000 steps (bench/RESULTS.md, twelfth session); this is the capacity step up from it
    "medium": {**TINY, "num_layers": 4, "num_single_layers": 8, "attention_head_dim": 64, "num_attention_heads": 6,
               "axes_dims_rope": (16, 24, 24)},
    # small with twice the double (text-image) blocks (27.4M): its failures are binding failures (an object drawn with
    # another one's colour or shape, one copy too many), and a joint block is where text and image tokens meet
    "deep": {**TINY, "num_layers": 8, "num_single_layers": 8, "attention_head_dim": 64, "axes_dims_rope": (16, 24, 24)},
    # and with 12 (36.8M): whether the trend goes on
    "deeper": {**TINY, "num_layers": 12, "num_single_layers": 8, "attention_head_dim": 64,
               "axes_dims_rope": (16, 24, 24)},
}

# Parameter counts the tests pin (flux-dev is FLUX.1-dev's published size).
PARAM_COUNTS = {"flux-dev": 11_901_408_320}


def transformer_kwargs(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}': choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[preset])
