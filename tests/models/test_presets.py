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
