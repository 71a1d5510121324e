"""cuDNN attention as one op that torch.compile does not look into.

torch's cuDNN SDPA kernel is ~1.8× flash at FLUX's shape and correct with q, k, v, output and output gradient all in
one layout (bench/attn_check.py). The routes into it through SDPA broke: diffusers' `_native_cudnn` hands the backward
an output gradient in another layout than the output. With torch 2.11 its gradients were wrong eagerly (relative
error 3×10⁴) and NaN compiled. Forcing the kernel on diffusers' non-contiguous q/k/v crashed when compiled (illegal
memory access). bench/RESULTS.md has both. Here the forward and backward are custom ops that inductor calls as opaque
kernels, and every tensor they pass to cuDNN is contiguous in one layout.

`install()` routes diffusers' `_native_cudnn` backend through these ops (the registry is process-wide; only models
set to that backend use it). On CPU the same ops run torch's CPU flash kernel, which has the same (output,
log-sum-exp) contract: the tests check the op's autograd, compile and checkpoint wiring there without a GPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    else:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                            scale=scale)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("fluxtrain::cudnn_attention", mutates_args=())
def cudnn_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """q, k, v: (batch, heads, tokens, head_dim). Returns the output and its log-sum-exp (for the backward)."""
    return _forward(q.contiguous(), k.contiguous(), v.contiguous(), scale)


@cudnn_attention.register_fake
def _(q, k, v, scale):
    return _forward(q, k, v, scale)  # torch's meta kernel gives the shapes


@torch.library.custom_op("fluxtrain::cudnn_attention_backward", mutates_args=())
def cudnn_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    grad, q, k, v = (x.contiguous() for x in (grad, q, k, v))  # the layout the output has: cuDNN needs them equal
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, scale=scale)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    # no dropout: the RNG state is unused (zeros, as torch's forward makes it then)
    seed = offset = torch.zeros(1, dtype=torch.long, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad, q, k, v, out, lse, seed, offset, None, None, None, q.shape[2], k.shape[2], 0.0, False, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@cudnn_attention_backward.register_fake
def _(grad, q, k, v, out, lse, scale):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))  # contiguous, like the op


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, grad, *_):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = cudnn_attention_backward(grad, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


cudnn_attention.register_autograd(_backward, setup_context=_setup_context)


def _native_cudnn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  return_lse=False, _parallel_config=None):
    """diffusers' backend signature; q/k/v arrive as (batch, tokens, heads, head_dim)."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa or return_lse or _parallel_config is not None:
        raise NotImplementedError("fluxtrain's cuDNN attention takes no mask, dropout, causal mask, GQA, LSE or "
                                  "context parallelism: use model.attention_backend = flash")
    q, k, v = (x.permute(0, 2, 1, 3).contiguous() for x in (query, key, value))  # saved for the backward as is
    out = cudnn_attention(q, k, v, scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))[0]
    return out.permute(0, 2, 1, 3)


def install() -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_CUDNN] = _native_cudnn
