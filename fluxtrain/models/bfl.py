"""Key mapping between diffusers' FluxTransformer2DModel and BFL's single-file layout (flux1-dev.safetensors).

diffusers ships only the BFL → diffusers direction, with FLUX.1's width hard-coded; this table works for any
width in both directions, so exports and the tiny default share it.
"""

from __future__ import annotations

import torch

# (BFL key, diffusers key) for tensors that are renamed one to one. {i} is the block index.
_TOP = [
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
    ("final_layer.linear", "proj_out"),
]
_DOUBLE = [
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
]
_DOUBLE_NORMS = [
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_SINGLE = [("modulation.lin", "norm.linear"), ("linear2", "proj_out")]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    # BFL's final AdaLN emits (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _blocks(sd: dict, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})


def bfl_to_diffusers(sd: dict[str, torch.Tensor], inner_dim: int) -> dict[str, torch.Tensor]:
    """Convert a BFL-layout state dict (optionally prefixed 'model.diffusion_model.')."""
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    for b, d in _TOP:
        for p in ("weight", "bias"):
            if f"{b}.{p}" in sd:
                out[f"{d}.{p}"] = sd[f"{b}.{p}"]
    for p in ("weight", "bias"):
        out[f"norm_out.linear.{p}"] = _swap_halves(sd[f"final_layer.adaLN_modulation.1.{p}"])
    for i in _blocks(sd, "double_blocks."):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for b, d in _DOUBLE:
            for p in ("weight", "bias"):
                out[f"{dst}{d}.{p}"] = sd[f"{src}{b}.{p}"]
        for b, d in _DOUBLE_NORMS:
            out[dst + d] = sd[src + b]
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for p in ("weight", "bias"):
                for name, part in zip(names, sd[f"{src}{stream}_attn.qkv.{p}"].chunk(3, dim=0)):
                    out[f"{dst}attn.{name}.{p}"] = part
    for i in _blocks(sd, "single_blocks."):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for b, d in _SINGLE:
            for p in ("weight", "bias"):
                out[f"{dst}{d}.{p}"] = sd[f"{src}{b}.{p}"]
        for b, d in _SINGLE_NORMS:
            out[dst + d] = sd[src + b]
        for p in ("weight", "bias"):
            t = sd[f"{src}linear1.{p}"]
            q, k, v, mlp = t.split([inner_dim, inner_dim, inner_dim, t.shape[0] - 3 * inner_dim], dim=0)
            for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                out[f"{dst}{name}.{p}"] = part
    return out


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `bfl_to_diffusers`: what `flux1-dev.safetensors` holds. Also converts any part of a state
    that holds whole blocks (a streamed export converts a block at a time), and meta tensors (to plan a file)."""
    out: dict[str, torch.Tensor] = {}
    for b, d in _TOP:
        for p in ("weight", "bias"):
            if f"{d}.{p}" in sd:
                out[f"{b}.{p}"] = sd[f"{d}.{p}"]
    for p in ("weight", "bias"):
        if f"norm_out.linear.{p}" in sd:
            out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(sd[f"norm_out.linear.{p}"])
    for i in _blocks(sd, "transformer_blocks."):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for b, d in _DOUBLE:
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{d}.{p}"]
        for b, d in _DOUBLE_NORMS:
            out[dst + b] = sd[src + d]
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for p in ("weight", "bias"):
                out[f"{dst}{stream}_attn.qkv.{p}"] = torch.cat([sd[f"{src}attn.{n}.{p}"] for n in names], dim=0)
    for i in _blocks(sd, "single_transformer_blocks."):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for b, d in _SINGLE:
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{d}.{p}"]
        for b, d in _SINGLE_NORMS:
            out[dst + b] = sd[src + d]
        for p in ("weight", "bias"):
            parts = [sd[f"{src}{n}.{p}"] for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
            out[f"{dst}linear1.{p}"] = torch.cat(parts, dim=0)
    return out


def is_bfl(keys) -> bool:
    return any(k.removeprefix("model.diffusion_model.").startswith(("double_blocks.", "img_in.")) for k in keys)
