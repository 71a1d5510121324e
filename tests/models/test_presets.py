import pytest
import torch

from fluxtrain.models.flux import build_transformer
from fluxtrain.models.presets import PARAM_COUNTS, transformer_kwargs


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_flux_dev_has_the_published_size():
    assert _count(build_transformer("flux-dev", "meta")) == PARAM_COUNTS["flux-dev"] == 11_901_408_320


def test_schnell_drops_guidance_only():
    dev, schnell = build_transformer("flux-dev", "meta"), build_transformer("flux-schnell", "meta")
    guidance = sum(p.numel() for n, p in dev.named_parameters() if "guidance_embedder" in n)
    assert guidance > 0 and _count(dev) - _count(schnell) == guidance


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        transformer_kwargs("flux-pro")


def test_meta_init_takes_no_memory():
    m = build_transformer("flux-dev", "meta")
    assert all(p.device.type == "meta" for p in m.parameters())


@pytest.mark.parametrize("preset, params", [("small", 17_883_712), ("medium", 40_046_400),
                                            ("deep", 27_352_640), ("deeper", 36_821_568)])
def test_the_benchmark_presets_run_with_the_tiny_encoders(preset, params):
    """small, medium, deep and deeper keep tiny's encoder widths (text 64, pooled 64) under a larger transformer: one
    forward and backward at the benchmark's 64 px (16×16 latents, 2×2 packed) with tiny-shaped text embeddings."""
    from fluxtrain import config as C

    assert C.load(None, ["--model.preset", preset]).model.preset == preset
    kw = transformer_kwargs(preset)
    torch.manual_seed(0)
    m = build_transformer(preset, "cpu")
    assert _count(m) == params
    tokens, text = 64, 12
    out = m(hidden_states=torch.randn(2, tokens, kw["in_channels"]),
            encoder_hidden_states=torch.randn(2, text, transformer_kwargs("tiny")["joint_attention_dim"]),
            pooled_projections=torch.randn(2, transformer_kwargs("tiny")["pooled_projection_dim"]),
            timestep=torch.rand(2), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
            guidance=torch.full((2,), 3.5), return_dict=False)[0]
    assert out.shape == (2, tokens, kw["in_channels"])
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
