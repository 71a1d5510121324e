"""Image-text contrastive (ITC) auxiliary loss, attached from outside the FLUX transformer.

The exported FluxTransformer2DModel is unchanged: a forward hook (`capture_block_output`) stores the image tokens of
one block's output, `pooled_image_features` averages them, and a separate `ITCHead` (saved separately) projects the
pooled image features and the frozen text encoders' pooled features into a joint space, where `itc_loss` computes the
symmetric InfoNCE (CLIP) loss.

Distributed: `itc_loss(..., gather=True)` all-gathers both projected embeddings across ranks with
`torch.distributed.nn.functional.all_gather` (differentiable) so every rank computes the loss of the *global* batch
(the same value on every rank, equal to the single-process loss on the concatenated batch). Its gradient on a rank
holds the other ranks' contributions to this rank's embeddings (all_gather's backward sums), so averaging the
parameter gradients over ranks (FSDP's reduce-scatter, DDP, or an explicit all_reduce/world) gives exactly the
single-process gradient. The head's parameters must therefore be averaged over ranks like the model's (e.g.
`fully_shard(head, mesh=...)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class ITCHead(nn.Module):
    """Two small projection MLPs (LayerNorm → Linear → GELU → Linear) and a learnable temperature.

    `logit_scale` = log(1/temperature), initialised at log(1/0.07) and clamped to at most log(100) in use (CLIP).
    """

    def __init__(self, img_dim: int, txt_dim: int, proj_dim: int = 256, temperature: float = 0.07,
                 hidden_dim: int | None = None):
        super().__init__()
        hidden = hidden_dim or proj_dim
        self.img_proj = nn.Sequential(nn.LayerNorm(img_dim), nn.Linear(img_dim, hidden), nn.GELU(),
                                      nn.Linear(hidden, proj_dim))
        self.txt_proj = nn.Sequential(nn.LayerNorm(txt_dim), nn.Linear(txt_dim, hidden), nn.GELU(),
                                      nn.Linear(hidden, proj_dim))
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))  # 1-D: FSDP2 shards no scalars
        self.config = {"img_dim": img_dim, "txt_dim": txt_dim, "proj_dim": proj_dim, "temperature": temperature,
                       "hidden_dim": hidden}

    def forward(self, img_feats: torch.Tensor, txt_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised embeddings [B, proj_dim] of pooled image features [B, img_dim] and text features."""
        p = self.img_proj[1].weight
        zi = self.img_proj(img_feats.to(p.dtype))
        zt = self.txt_proj(txt_feats.to(p.dtype))
        return F.normalize(zi.float(), dim=-1), F.normalize(zt.float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.float().clamp(max=math.log(100.0)).exp().squeeze()

    def no_weight_decay(self) -> list[str]:
        """Parameter names that should get weight_decay = 0 (temperature, norms, biases)."""
        return [n for n, p in self.named_parameters() if p.ndim < 2]


def pooled_image_features(hidden_states: torch.Tensor) -> torch.Tensor:
    """Mean over the image tokens: [B, N, D] → [B, D] (a DTensor/other tensor subclass works alike)."""
    return hidden_states.mean(dim=1)


def _gather(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def itc_loss(head: ITCHead, img_feats: torch.Tensor, txt_feats: torch.Tensor, gather: bool = True,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between pooled image features [B, img_dim] and text features [B, txt_dim].

    gather: all-gather the projected embeddings over the default process group (only if it is initialised and has
      more than one rank), so negatives come from the global batch; every rank returns the global loss. Every rank
      must call it (a collective) with the same batch size.
    valid: optional bool [B]: rows that take part (e.g. False for captions dropped for classifier-free guidance).
    The same caption twice in a batch needs no special care: identical text embeddings give identical logit
    columns, so hard labels already equal soft targets spread over the duplicates (same loss, same gradient).
    Returns a 0-dim float32 loss (0, with a graph, if fewer than two valid rows).
    """
    zi, zt = head(img_feats, txt_feats)
    gather = gather and _world() > 1
    if gather:
        zi, zt = _gather(zi), _gather(zt)
    if valid is not None:  # (a boolean index makes the host wait for the device: only where rows are left out)
        v = valid.to(zi.device).bool()
        v = _gather(v.to(torch.uint8)).bool() if gather else v
        zi, zt = zi[v], zt[v]
    n = zi.shape[0]
    if n < 2:
        return (zi.sum() + zt.sum() + head.logit_scale.float().sum()) * 0.0
    logits = head.scale() * zi @ zt.t()  # [image i, text j]
    labels = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# ------------------------------------------------------------------------------------------- capture hook

@dataclass
class Capture:
    """What `capture_block_output` stores: `features` = the image tokens [B, N_img, D] of the block's last output
    (with autograd graph), or None. `enabled = False` makes the hook a no-op (e.g. while sampling)."""

    handle: object = None
    features: torch.Tensor | None = None
    enabled: bool = True
    calls: int = 0
    block: str = ""
    extra: dict = field(default_factory=dict)

    def pop(self) -> torch.Tensor:
        """The captured features, cleared (so a stale tensor is never reused); error if nothing was captured."""
        if self.features is None:
            raise RuntimeError(f"no features captured from {self.block} (was the model called with the hook "
                               f"enabled?)")
        f, self.features = self.features, None
        return f

    def clear(self) -> None:
        self.features = None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.features = None


def _resolve_block(model: nn.Module, block_index: int, kind: str) -> tuple[nn.Module, str]:
    name = {"single": "single_transformer_blocks", "double": "transformer_blocks"}[kind]
    blocks = getattr(model, name)
    idx = block_index if block_index >= 0 else len(blocks) + block_index
    if not 0 <= idx < len(blocks):
        raise IndexError(f"{name}[{block_index}] out of range (the model has {len(blocks)})")
    return blocks[idx], f"{name}[{idx}]"


def capture_block_output(model: nn.Module, block_index: int, kind: str = "single") -> Capture:
    """Register a forward hook on `model.single_transformer_blocks[block_index]` (kind="single") or
    `model.transformer_blocks[block_index]` (kind="double"; negative indices count from the end) that stores the
    image-token part of the block's output in the returned `Capture`.

    Diffusers' FLUX blocks return (encoder_hidden_states, hidden_states): the image tokens are the second. An older
    single block returning one concatenated [text; image] tensor is handled too (the text length is read from the
    call's encoder_hidden_states). The hook sits on whatever module is in the list, so an activation-checkpoint
    wrapper or FSDP2 unit around the block is fine (it fires once per forward, not again on recomputation). The
    model's parameters, state_dict and export are untouched; `capture.remove()` takes the hook off.
    """
    block, where = _resolve_block(model, block_index, kind)
    cap = Capture(block=where)

    def hook(_mod, args, kwargs, output):
        if not cap.enabled:
            return None
        if isinstance(output, (tuple, list)):
            img = output[1]
        else:  # one [text; image] tensor
            enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            img = output[:, enc.shape[1]:] if enc is not None else output
        cap.features = img
        cap.calls += 1
        return None

    cap.handle = block.register_forward_hook(hook, with_kwargs=True)
    return cap


def head_for(model: nn.Module, text_dim: int, proj_dim: int = 256, temperature: float = 0.07) -> ITCHead:
    """An ITCHead sized for a FLUX transformer (image dim = heads × head dim) and a text feature width (the CLIP
    pooled width = model.config.pooled_projection_dim for the pooled prompt embedding)."""
    c = model.config
    return ITCHead(c.num_attention_heads * c.attention_head_dim, text_dim, proj_dim, temperature)


# FluxTransformer2DModel.forward's per-sample arguments (the position ids are shared by the batch)
_BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


class ITCObjective:
    """The trainer's side of ITC: a head sharded like the model, its own optimizer, and the auxiliary loss.

    Image features come from the same noisy latents with the *empty* prompt (a copy of the batch that joins it in
    one forward): on the text-conditioned pass the head can match captions from text leaking through joint
    attention alone (held-out ITC loss 1.32 on pure noise + caption vs 1.32 on image + empty prompt, 0.77 on
    image + caption).
    """

    def __init__(self, model: nn.Module, mesh, text_dim: int, weight: float, optim_cfg, total_steps: int,
                 device: torch.device, block_index: int = -1):
        from torch.distributed.fsdp import fully_shard

        from fluxtrain.optim import build_optimizer, build_scheduler

        self.weight, self.last = weight, None
        self.capture = capture_block_output(model, block_index, kind="double")
        self.capture.enabled = False
        self.head = head_for(model, text_dim).to(device)
        if mesh.size() > 1:
            fully_shard(self.head, mesh=mesh)  # averages the head's gradients over ranks like the model's
        self.opt = build_optimizer(self.head.parameters(), optim_cfg)
        self.sched = build_scheduler(self.opt, total_steps, optim_cfg)

    def forward(self, model, inputs: dict, empty_seq: torch.Tensor, empty_pooled: torch.Tensor,
                pooled: torch.Tensor, view: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's prediction for `inputs` and the weighted ITC loss, from one forward of the batch joined with
        its empty-prompt copy: one pass over the blocks (under FSDP one all-gather each, not two) with the same
        results as two forwards, the model treating each sample on its own. An empty prompt of another length than
        the captions can't join the batch: then two forwards. `view`: inputs of the copy that differ from the
        batch's (`hidden_states` and `timestep` at a lower noise level, train.itc_sigma_scale)."""
        uncond = self._uncond(inputs, empty_seq, empty_pooled, view)
        if uncond["encoder_hidden_states"].shape[1:] != inputs["encoder_hidden_states"].shape[1:]:
            return model(**inputs)[0], self.loss(model, inputs, empty_seq, empty_pooled, pooled, view)
        b = inputs["hidden_states"].shape[0]
        joint = {k: torch.cat([v, uncond[k]]) if k in _BATCHED and v is not None else v for k, v in inputs.items()}
        out = self._captured(model, joint)
        return out[:b], self._loss(pooled_image_features(self.capture.pop()[b:]), pooled)

    def loss(self, model, inputs: dict, empty_seq: torch.Tensor, empty_pooled: torch.Tensor,
             pooled: torch.Tensor, view: dict | None = None) -> torch.Tensor:
        """The weighted ITC loss from a separate forward of the batch with the empty prompt."""
        return self._loss(self.features(model, inputs, empty_seq, empty_pooled, view), pooled)

    def features(self, model, inputs: dict, empty_seq: torch.Tensor, empty_pooled: torch.Tensor,
                 view: dict | None = None) -> torch.Tensor:
        """The pooled image features ITC reads: the captured block's output on a forward of the batch with the
        empty prompt."""
        self._captured(model, self._uncond(inputs, empty_seq, empty_pooled, view))
        return pooled_image_features(self.capture.pop())

    def _uncond(self, inputs: dict, empty_seq: torch.Tensor, empty_pooled: torch.Tensor,
                view: dict | None = None) -> dict:
        b = inputs["hidden_states"].shape[0]
        return dict(inputs, encoder_hidden_states=empty_seq.expand(b, -1, -1).to(inputs["encoder_hidden_states"].dtype),
                    pooled_projections=empty_pooled.expand(b, -1).to(inputs["pooled_projections"].dtype),
                    txt_ids=inputs["txt_ids"][: empty_seq.shape[1]], **(view or {}))

    def _captured(self, model, inputs: dict) -> torch.Tensor:
        self.capture.enabled = True
        try:
            return model(**inputs)[0]
        finally:
            self.capture.enabled = False

    def _loss(self, feats: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        loss = itc_loss(self.head, feats.float(), pooled.float(), gather=True)
        self.last = loss.detach()  # unweighted, the global batch's: the log row's itc_loss (read on log steps only)
        return self.weight * loss

    def step(self, skip: bool | torch.Tensor = False) -> None:
        """The head's step, skipped where the model's was (a non-finite model gradient): `skip` is a bool, or the
        device flag of the model's fused AdamW (train.QueuedStep: the host has not read the norm yet), which the
        head's fused AdamW reads the same way. The schedule advances either way, as the model's does."""
        if isinstance(skip, torch.Tensor):
            self.opt.found_inf = skip
        if skip is True:
            self.opt.zero_grad(set_to_none=True)
        else:
            torch.nn.utils.clip_grad_norm_([p for p in self.head.parameters() if p.grad is not None], 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.sched.step()
