"""LoRA for the FLUX transformer with peft, injected on the meta device before FSDP2 wraps the blocks.

The model stays a `FluxTransformer2DModel` (diffusers' `PeftAdapterMixin.add_adapter`, i.e. peft's
`inject_adapter_in_model`): each targeted `nn.Linear` becomes a peft `lora.Linear` holding the frozen linear as
`base_layer` and the adapter as `lora_A.default` / `lora_B.default`. Everything stays inside the transformer blocks,
so `fully_shard` per block shards the adapters with their block.

Order in the training build (see `build_training_model`):

    model = build_transformer(kw, device="meta")
    apply_lora(model, rank, alpha, dropout, targets, init, base_dtype)   # on meta: no memory
    parallelize(model, mesh, cfg)                                         # AC → compile → fully_shard
    model.to_empty(device=...)
    load_base_into(model, iter_pretrained_state(...) or random_init_state(...))   # base names gain ".base_layer"
    init_lora_weights(model, seed, init)                                  # deterministic, sharding-independent

State-dict names: base weights move to `<module>.base_layer.weight`; adapters are
`<module>.lora_A.default.weight` (model / DCP names). The exported diffusers/peft names drop the adapter name:
`transformer.<module>.lora_A.weight` (what `FluxPipeline.load_lora_weights` reads).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Iterator

import torch

ADAPTER = "default"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# The attention and MLP linears of both block kinds (single-stream blocks have no attn.to_out: proj_out there).
DEFAULT_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)
INITS = ("gaussian", "kaiming")
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


class LoraError(ValueError):
    """A LoRA setting or file that does not fit, told in one line."""


# ---- injection --------------------------------------------------------------------------------------------------
def target_regex(targets: Iterable[str]) -> str:
    """A peft `target_modules` regex (peft full-matches it) for the named linears inside the transformer blocks
    only: the root `proj_out` (the final projection) and the embedders are never adapted."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise LoraError("lora.targets is empty: name at least one linear, e.g. to_q")
    alt = "|".join(re.escape(t) for t in targets)
    return rf"(?:transformer_blocks|single_transformer_blocks)\.\d+\.(?:.+\.)?(?:{alt})"


def apply_lora(model: torch.nn.Module, rank: int = 16, alpha: float = 16.0, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS, init: str = "gaussian",
               base_dtype: torch.dtype | str | None = None) -> torch.nn.Module:
    """Inject LoRA adapters in place (works on the meta device; call before `parallelize`). The base weights are
    frozen, the adapters trainable (fp32). `base_dtype` ("bf16"/torch.bfloat16) stores the frozen weights in bf16:
    half their memory, and the same numerics as fp32 storage under bf16 mixed precision (FSDP2 casts fp32 → bf16
    for the all-gather anyway); it needs `parallel.mixed_precision = "bf16"`. Returns the model."""
    from peft import LoraConfig

    targets = [targets] if isinstance(targets, str) else list(targets)
    if init not in INITS:
        raise LoraError(f"lora.init = {init!r}: choose one of {', '.join(INITS)}")
    if rank < 1:
        raise LoraError(f"lora.rank = {rank}: must be ≥ 1")
    if any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules()):
        raise LoraError("apply_lora must run before activation checkpointing / FSDP (before parallelize)")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(targets),
                     init_lora_weights=True if init == "kaiming" else "gaussian", bias="none")
    try:
        model.add_adapter(cfg, adapter_name=ADAPTER)
    except ValueError as err:  # peft's NoMatchingPeftModuleError is a ValueError
        if "not found" in str(err):
            raise LoraError(f"lora.targets {list(targets)} matched no linear inside the transformer blocks") from None
        raise
    n = 0
    for name, p in model.named_parameters():
        is_lora = _is_lora(name)
        p.requires_grad_(is_lora)
        if is_lora:
            n += 1
            if p.dtype != torch.float32:
                p.data = p.data.float()
    if n == 0:
        raise LoraError(f"lora.targets {list(targets)} matched no linear inside the transformer blocks")
    dt = _dtype(base_dtype)
    if dt is not None and dt != torch.float32:
        cast_frozen(model, dt)
    return model


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter in `dtype` (on meta: before sharding, so `to_empty` allocates it so)."""
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and not p.requires_grad and p.dtype != dtype and p.is_floating_point():
                mod._parameters[pname] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)


def _dtype(d) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if d not in table:
        raise LoraError(f"lora.base_dtype = {d!r}: choose fp32 or bf16")
    return table[d]


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def clean_name(name: str) -> str:
    """A parameter's FQN without AC/compile/FSDP1 wrapper parts: the name DCP and `state_dict()` use."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state. A module with reshard_after_forward=False (the root, the
    last block) keeps its parameters unsharded after a forward without backward (sampling), and then
    `named_parameters()` yields its plain unsharded tensors, not the sharded DTensors that the optimizer updates."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def lora_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(clean model name, parameter) of every adapter weight, e.g. `…attn.to_q.lora_A.default.weight`
    (the sharded DTensors under FSDP2)."""
    reshard(model)
    for name, p in model.named_parameters():
        if _is_lora(name):
            yield clean_name(name), p


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer gets: the parameters with requires_grad (the adapters after `apply_lora`), the sharded
    DTensors under FSDP2 (resharded first: never the transient unsharded tensors left by a no-grad forward)."""
    reshard(model)
    return [p for p in model.parameters() if p.requires_grad]


def lora_config(model: torch.nn.Module):
    cfgs = getattr(model, "peft_config", None)
    if not cfgs or ADAPTER not in cfgs:
        raise LoraError("the model has no LoRA adapter: call apply_lora first")
    return cfgs[ADAPTER]


# ---- weights after to_empty ---------------------------------------------------------------------------------------
def _copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a (possibly DTensor-sharded) parameter: every rank slices the same full tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(dst, DTensor):
            full = full.to(device=dst.device, dtype=dst.dtype)
            local = distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None)
            dst.to_local().copy_(local.to_local())
        else:
            dst.copy_(full.to(device=dst.device, dtype=dst.dtype))


def lora_init_tensor(name: str, shape, seed: int, init: str, rank: int) -> torch.Tensor:
    """The full initial value of one adapter weight from its own generator (seed, clean name): the same values
    whatever the world size, sharding, AC or compile. A as peft initialises it (gaussian: N(0, 1/r²);
    kaiming: U(±1/√fan_in), nn.Linear's default), B zeros, so the adapted model starts equal to the base."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if init == "gaussian":
        return torch.randn(shape, generator=g) / rank
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def init_lora_weights(model: torch.nn.Module, seed: int = 0, init: str | None = None) -> None:
    """Initialise every adapter weight after `to_empty` (deterministic and sharding-independent)."""
    cfg = lora_config(model)
    if init is None:
        init = "kaiming" if cfg.init_lora_weights is True else str(cfg.init_lora_weights)
    for name, p in lora_parameters(model):
        _copy_full_into(p, lora_init_tensor(name, tuple(p.shape), seed, init, cfg.r))


def load_base_into(model: torch.nn.Module, items: Iterable[tuple[str, torch.Tensor]]) -> None:
    """`flux.load_state_into` for a LoRA model: pretrained / random-init (diffusers names) go into the frozen
    `…base_layer.…` parameters; every base weight must be given; the adapters are left to `init_lora_weights`."""
    from fluxtrain.models.flux import WeightsError

    reshard(model)
    own = {k: v for k, v in model.state_dict().items() if not _is_lora(k)}
    alias = {k.replace(".base_layer.", "."): k for k in own}
    seen = set()
    for key, full in items:
        dst_key = alias.get(key, key)
        if dst_key not in own:
            raise WeightsError(f"unexpected weight '{key}' (model has no such parameter): wrong preset or file?")
        dst = own[dst_key]
        if tuple(full.shape) != tuple(dst.shape):
            raise WeightsError(f"shape mismatch at '{key}': file {tuple(full.shape)} vs model {tuple(dst.shape)}")
        _copy_full_into(dst, full)
        seen.add(dst_key)
    missing = sorted(set(own) - seen)
    if missing:
        raise WeightsError(f"missing weight '{missing[0]}' (and {len(missing) - 1} more) in the pretrained file")


# ---- export -------------------------------------------------------------------------------------------------------
def peft_name(model_name: str) -> str:
    """Model name → peft/diffusers name without the prefix: `…to_q.lora_A.default.weight` → `…to_q.lora_A.weight`."""
    return clean_name(model_name).replace(f".{ADAPTER}.", ".")


def lora_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None,
                    prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """Full (gathered) adapter weights on CPU, keys as diffusers' `FluxPipeline.save_lora_weights` writes them
    (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`). A collective under FSDP: call on every rank.
    Use `prefix=""` for `transformer_lora_layers=` of `save_lora_weights` (it adds the prefix itself)."""
    out = {}
    for name, p in lora_parameters(model):
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        t = t.cpu()
        out[prefix + peft_name(name)] = t.to(dtype) if dtype is not None else t.clone()
    return out


def adapter_metadata(model: torch.nn.Module) -> dict:
    """The LoraConfig that diffusers stores in the safetensors header (`lora_adapter_metadata`): with it,
    `load_lora_weights` uses our lora_alpha (scaling alpha/r) and targets instead of guessing alpha = r."""
    d = lora_config(model).to_dict()
    d["lora_dropout"] = 0.0
    return json.loads(json.dumps(d, default=str))


def lora_metadata(rank: int, alpha: float, targets: Iterable[str] = DEFAULT_TARGETS) -> dict:
    """The same metadata without a model (exporting a checkpoint's adapters offline)."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_regex(targets), bias="none")
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def write_lora(state: dict[str, torch.Tensor], out_dir: str | Path, metadata: dict | None,
               dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers LoRA folder (`pytorch_lora_weights.safetensors`) from full adapter tensors under peft
    names, with or without the `transformer.` prefix. One process; no collective."""
    from diffusers import FluxPipeline

    sd = {k.removeprefix("transformer."): (v.to(dtype) if dtype is not None else v).contiguous()
          for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=sd, transformer_lora_adapter_metadata=metadata,
                                   weight_name=WEIGHT_NAME)
    return out / WEIGHT_NAME


def save_lora(model: torch.nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None,
              ema=None) -> Path | None:
    """Write `out_dir/pytorch_lora_weights.safetensors` (diffusers format, with adapter metadata) on rank 0.
    A collective under FSDP: call on every rank. `ema` (fluxtrain.ema.EMA): export the EMA adapter weights.
    Returns the file on rank 0, None elsewhere."""
    import torch.distributed as dist

    with (ema.swap_into(model) if ema is not None else nullcontext()):
        sd = lora_state_dict(model, dtype=dtype, prefix="")
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return write_lora(sd, out_dir, adapter_metadata(model))


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state, adapter metadata or None) of a diffusers LoRA file or folder written by `save_lora`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / WEIGHT_NAME
    with safe_open(str(p), framework="pt") as f:
        header = f.metadata() or {}
    meta = header.get("lora_adapter_metadata")
    meta = json.loads(meta) if meta else None
    if meta is not None and any(k.startswith("transformer.") for k in meta):
        meta = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    return load_file(str(p)), meta


def merge_lora_state(base_state: dict[str, torch.Tensor], lora_state: dict[str, torch.Tensor], alpha: float,
                     rank: int) -> dict[str, torch.Tensor]:
    """A full transformer state with the adapters folded in: W + (alpha/rank)·B·A (computed in fp32, stored in
    the base weight's dtype). `base_state` has diffusers names (`…attn.to_q.weight`), `lora_state` peft names with
    or without the `transformer.` prefix. Returns a new dict; the inputs are not modified."""
    scale = alpha / rank
    out = dict(base_state)
    pairs = {}
    for k, v in lora_state.items():
        k = k.removeprefix("transformer.")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", k)
        if m is None:
            raise LoraError(f"'{k}' is not a LoRA weight name (…lora_A.weight / …lora_B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"LoRA weights of '{mod}' lack lora_{'B' if 'A' in ab else 'A'}")
        key = mod.removesuffix(".base_layer") + ".weight"
        if key not in base_state:
            raise LoraError(f"LoRA for '{mod}' but the base state has no '{key}'")
        w = base_state[key]
        delta = ab["B"].float() @ ab["A"].float()
        if tuple(delta.shape) != tuple(w.shape):
            raise LoraError(f"LoRA of '{mod}' is {tuple(delta.shape)}, base weight {tuple(w.shape)}")
        out[key] = (w.float() + scale * delta.to(w.device)).to(w.dtype)
    return out


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights under diffusers names (full, on CPU; a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    out = {}
    for k, v in sd.items():
        if _is_lora(k):
            continue
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k.replace(".base_layer.", ".")] = v.detach().cpu()
    return out


def merged_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model with its adapters folded in, as a plain diffusers transformer state (a collective under FSDP)."""
    cfg = lora_config(model)
    merged = merge_lora_state(base_state_dict(model), lora_state_dict(model, prefix=""), cfg.lora_alpha, cfg.r)
    return {k: v.to(dtype) for k, v in merged.items()} if dtype is not None else merged


def lora_state_from_checkpoint(ckpt: str | Path, section: str = "model",
                               prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """The adapter weights of a DCP training checkpoint (`section` "model" or "ema"), read without a process
    group (DCP reassembles the shards), under diffusers names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from fluxtrain.checkpoint import read_metadata, storage_reader

    known = read_metadata(ckpt)  # once, and any failure as one line
    meta = known.state_dict_metadata
    head = section + "."
    want = {k[len(head):]: torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in meta.items() if k.startswith(head) and _is_lora(k) and isinstance(m, TensorStorageMetadata)}
    if not want:
        raise LoraError(f"{ckpt}: no LoRA weights under '{section}' (was the run trained with LoRA?)")
    state = {section: want}
    dcp.load(state, storage_reader=storage_reader(ckpt, known))
    return {prefix + peft_name(k): v for k, v in state[section].items()}
