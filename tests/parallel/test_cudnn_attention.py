"""fluxtrain's opaque attention op (the cuDNN route on a GPU, torch's CPU flash kernel here): gradients against plain
softmax attention, eagerly and compiled, through diffusers' FLUX blocks, and saved (not recomputed) by op-level SAC."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fluxtrain import config as C
from fluxtrain.models.flux import build_transformer
from fluxtrain.models.presets import transformer_kwargs
from fluxtrain.parallel import cudnn_attention as CA
from fluxtrain.parallel.activation_checkpoint import apply_ac


def _reference(q, k, v, scale):
    w = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    return (w @ v.double()).to(q.dtype)


def _grads(fn, q, k, v):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum(), (q, k, v)))


@pytest.mark.parametrize("compiled", [False, True])
def test_op_matches_softmax_attention(compiled):
    torch.manual_seed(0)
    # diffusers' layout (batch, tokens, heads, head_dim), non-contiguous like the projections' views
    q, k, v = (torch.randn(2, 3, 40, 8).transpose(1, 2) for _ in range(3))
    ours = torch.compile(CA._native_cudnn, fullgraph=True) if compiled else CA._native_cudnn
    got = _grads(lambda q, k, v: ours(q, k, v, scale=0.3), q, k, v)
    want = _grads(lambda q, k, v: _reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.3)
                  .transpose(1, 2), q, k, v)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_wrapper_refuses_what_it_does_not_compute():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="model.attention_backend = flash"):
        CA._native_cudnn(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))


def _tiny(backend: str | None, ac: str = "none"):
    torch.manual_seed(0)
    model = build_transformer(transformer_kwargs("tiny"), device="cpu").to(torch.bfloat16)
    if backend:
        CA.install()
        model.set_attention_backend(backend)
    apply_ac(model, C.ParallelConfig(activation_checkpointing="selective" if ac == "ops" else ac, ac_ops=ac == "ops"))
    return model


def _step(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 64, generator=g).bfloat16()
    seq = torch.randn(2, 8, 64, generator=g).bfloat16()
    pooled = torch.randn(2, 64, generator=g).bfloat16()
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    out = model(hidden_states=x, encoder_hidden_states=seq, pooled_projections=pooled,
                timestep=torch.full((2,), 0.5), img_ids=ids, txt_ids=torch.zeros(8, 3),
                guidance=torch.ones(2), return_dict=False)[0]
    out.float().square().mean().backward()
    return out.float(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def test_flux_blocks_through_the_op_train_like_torch_attention():
    """diffusers' _native_cudnn backend, rerouted by install(), in the real FLUX blocks (bf16, CPU)."""
    out, grad = _step(_tiny("_native_cudnn"))
    out_ref, grad_ref = _step(_tiny(None))
    assert (out - out_ref).norm() / out_ref.norm() < 1e-2
    assert (grad - grad_ref).norm() / grad_ref.norm() < 2e-2


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_op_level_sac_saves_the_attention_output():
    model = _tiny("_native_cudnn", ac="ops")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 64, generator=g).bfloat16()
    ids = torch.zeros(16, 3)
    out = model(hidden_states=x, encoder_hidden_states=torch.randn(1, 8, 64).bfloat16(),
                pooled_projections=torch.randn(1, 64).bfloat16(), timestep=torch.full((1,), 0.5), img_ids=ids,
                txt_ids=torch.zeros(8, 3), guidance=torch.ones(1), return_dict=False)[0]
    with _Ops() as mode:
        out.float().sum().backward()
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert mode.seen.count(torch.ops.fluxtrain.cudnn_attention_backward.default) == blocks
    assert torch.ops.fluxtrain.cudnn_attention.default not in mode.seen  # saved, so not run again in the backward
    assert torch.ops.aten.mm.default in mode.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [512, 80, 200])  # FLUX-like, the tiny default's 64 + 16, a length ≡ 64 mod 128
def test_cudnn_op_matches_softmax_attention_on_gpu(tokens):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, tokens, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = _grads(lambda q, k, v: torch.compile(CA._native_cudnn)(q, k, v), q, k, v)
    want = _grads(lambda q, k, v: _reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             64 ** -0.5).transpose(1, 2), q, k, v)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert float((g.float() - w.float()).norm() / w.float().norm()) < 1e-2
