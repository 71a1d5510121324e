import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from fluxtrain import flow
from fluxtrain.models import bfl
from fluxtrain.models.flux import build_transformer, init_weights, iter_pretrained_state, load_state_into
from fluxtrain.models.presets import transformer_kwargs


def _tiny(seed=0):
    m = build_transformer("tiny", "cpu")
    init_weights(m, transformer_kwargs("tiny"), seed=seed)
    return m


def test_bfl_file_gives_the_same_outputs(tmp_path):
    from safetensors.torch import save_file

    ref = _tiny(seed=3)
    sd = ref.state_dict()
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.diffusers_to_bfl(sd).items()},
              str(tmp_path / "flux1-tiny.safetensors"))
    loaded = build_transformer("tiny", "cpu")
    init_weights(loaded, transformer_kwargs("tiny"), seed=99)
    load_state_into(loaded, iter_pretrained_state(tmp_path / "flux1-tiny.safetensors", inner_dim=128))
    x, seq, pooled = torch.randn(2, 64, 64), torch.randn(2, 16, 64), torch.randn(2, 64)
    args = flow.transformer_inputs(x, torch.tensor([0.3, 0.8]), seq, pooled, 16, 16, 1.0)
    assert torch.equal(ref(**args)[0], loaded(**args)[0])


def test_our_bfl_reader_agrees_with_diffusers_converter():
    # diffusers' converter hard-codes FLUX.1's width (3072) on dim 0 of the fused tensors; other dims can be tiny.
    d, mlp, g = 3072, 4 * 3072, torch.Generator().manual_seed(0)
    sd = {}

    def t(*shape):
        return torch.randn(*shape, generator=g)

    for name in ("time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
                 "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "img_in", "final_layer.linear"):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = t(4, 2), t(4)
    sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"] = t(6, 2), t(6)
    for i in range(2):
        p = f"double_blocks.{i}."
        for n in ("img_mod.lin", "txt_mod.lin", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2", "img_attn.proj",
                  "txt_attn.proj"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = t(4, 2), t(4)
        for n in ("img_attn.qkv", "txt_attn.qkv"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = t(9, 2), t(9)
        for n in ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
                  "txt_attn.norm.key_norm"):
            sd[p + n + ".scale"] = t(2)
    p = "single_blocks.0."
    sd[p + "linear1.weight"], sd[p + "linear1.bias"] = t(3 * d + mlp, 1), t(3 * d + mlp)
    sd[p + "linear2.weight"], sd[p + "linear2.bias"] = t(4, 2), t(4)
    sd[p + "modulation.lin.weight"], sd[p + "modulation.lin.bias"] = t(4, 2), t(4)
    sd[p + "norm.query_norm.scale"], sd[p + "norm.key_norm.scale"] = t(2), t(2)
    ours = bfl.bfl_to_diffusers(dict(sd), inner_dim=d)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    back = bfl.diffusers_to_bfl(ours)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_wrong_shape_names_the_key(tmp_path):
    import pytest

    from fluxtrain.models.flux import WeightsError

    m = _tiny()
    sd = {k: v for k, v in m.state_dict().items()}
    sd["x_embedder.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match="x_embedder.weight"):
        load_state_into(_tiny(), iter(sd.items()))
