"""torchrun harness for tests/test_lora.py and tests/test_ema.py: 2-rank FSDP2 (gloo, CPU, fp32) runs of the tiny
model with LoRA / EMA. Usage: torchrun --nproc_per_node=2 tests/lora_harness.py {lora|ema} OUT_DIR

Writes OUT_DIR/results.json (rank 0) plus the files the pytest side checks."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh

from fluxtrain import config as C
from fluxtrain import flow
from fluxtrain import lora as L
from fluxtrain.ema import EMA
from fluxtrain.models.flux import build_transformer, init_weights, iter_pretrained_state
from fluxtrain.models.setup import model_kwargs
from fluxtrain.models.tiny import tiny_folder
from fluxtrain.optim import build_optimizer
from fluxtrain.parallel import parallelize

RANK_, ALPHA_ = 4, 8.0  # alpha ≠ rank: the export must carry the scaling


def cfg_of(mp="fp32", ac="full") -> C.Config:
    cfg = C.Config()
    cfg.model.pretrained = str(tiny_folder())
    cfg.model.max_text_tokens = 16
    cfg.parallel.strategy = "FULL_SHARD"
    cfg.parallel.mixed_precision = mp
    cfg.parallel.activation_checkpointing = ac
    return cfg


def build(cfg, mesh, lora: bool, lora_seed: int = 0, base_dtype=None):
    """The training build order with LoRA inserted: meta → apply_lora → parallelize → to_empty → weights."""
    kw = model_kwargs(cfg)
    model = build_transformer(kw, device="meta")
    if lora:
        L.apply_lora(model, rank=RANK_, alpha=ALPHA_, dropout=0.0, init="gaussian", base_dtype=base_dtype)
    parallelize(model, mesh, cfg)
    model.to_empty(device="cpu")
    if lora:
        L.load_base_into(model, iter_pretrained_state(cfg.model.pretrained, 128))
        L.init_lora_weights(model, seed=lora_seed)
    else:
        init_weights(model, kw, seed=0)
    return model


def batch(rank: int, n: int = 2):
    g = torch.Generator().manual_seed(100 + rank)
    x0 = torch.randn(n, 64, 64, generator=g)
    noise = torch.randn(n, 64, 64, generator=g)
    sigma = torch.rand(n, generator=g) * 0.8 + 0.1
    seq, pooled = torch.randn(n, 16, 64, generator=g), torch.randn(n, 64, generator=g)
    return x0, noise, sigma, seq, pooled


def loss_of(model, b):
    x0, noise, sigma, seq, pooled = b
    pred = model(**flow.transformer_inputs(flow.noisy_input(x0, noise, sigma), sigma, seq, pooled, 16, 16, 1.0))[0]
    return flow.flow_loss(pred, flow.target(x0, noise), sigma)


def probe(model):
    """A fixed forward (same input on every rank) for output comparisons."""
    g = torch.Generator().manual_seed(7)
    x, seq, pooled = torch.randn(1, 64, 64, generator=g), torch.randn(1, 16, 64, generator=g), torch.randn(1, 64, generator=g)
    with torch.no_grad():
        return model(**flow.transformer_inputs(x, torch.tensor([0.6]), seq, pooled, 16, 16, 1.0))[0]


def full_trainable(model) -> dict[str, torch.Tensor]:
    return {L.clean_name(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def mean_all(x: torch.Tensor) -> float:
    x = x.detach().clone()
    dist.all_reduce(x)
    return float(x) / dist.get_world_size()


def local_bytes(model, trainable: bool) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
               for p in model.parameters() if p.requires_grad == trainable)


def train(model, opt, ema, steps, rank, ref_ema=None):
    losses = []
    b = batch(rank)
    for step in range(1, steps + 1):
        loss = loss_of(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_all(loss))
        if ema is not None:
            did = ema.update(model, step)
            full = full_trainable(model)  # collective: every rank
            if ref_ema is not None and did:  # the single-process reference: plain tensors, the same formula
                d = min(ema.decay, (1 + step) / (10 + step)) if ema.warmup else ema.decay
                for k in ref_ema:
                    ref_ema[k] = ref_ema[k].lerp(full[k], 1.0 - d)
    return losses


def run_lora(out: Path, rank: int, mesh) -> dict:
    res = {}
    cfg = cfg_of()
    model = build(cfg, mesh, lora=True)
    res["n_lora_params"] = len(list(L.lora_parameters(model)))
    res["trainable_all_lora"] = all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    res["lora_placements"] = sorted({str(p.placements) for _, p in L.lora_parameters(model)})
    # init: sharding-independent values (every full tensor equals the per-name generator's), B zeros
    init = L.lora_state_dict(model, prefix="")
    cfg_l = L.lora_config(model)
    res["init_matches"] = all(torch.equal(v, L.lora_init_tensor(n, tuple(v.shape), 0, "gaussian", cfg_l.r))
                              for n, v in zip([n for n, _ in L.lora_parameters(model)], init.values()))
    res["init_B_zero"] = all(not v.any() for k, v in init.items() if "lora_B" in k)
    # the adapted model starts equal to the base model
    base_before = L.base_state_dict(model)
    out0 = probe(model)
    if rank == 0:
        plain = build_transformer(model_kwargs(cfg), device="cpu")
        plain.load_state_dict(base_before)
        res["init_equals_base_maxdiff"] = float((probe(plain) - out0).abs().max())

    opt = build_optimizer(L.trainable_parameters(model), C.OptimConfig(lr=2e-3))
    ema = EMA(model, decay=0.9, every=2, warmup=True)
    ref_ema = {k: v.clone() for k, v in full_trainable(model).items()}
    t0 = time.perf_counter()
    res["losses"] = train(model, opt, ema, 20, rank, ref_ema)
    res["train_s"] = time.perf_counter() - t0

    base_after = L.base_state_dict(model)
    res["base_keys"] = len(base_before)
    res["base_bit_identical"] = base_before.keys() == base_after.keys() and all(
        torch.equal(base_before[k], base_after[k]) for k in base_before)
    after = L.lora_state_dict(model, prefix="")
    res["lora_changed"] = sum(not torch.equal(init[k], after[k]) for k in init)
    res["lora_B_absmax"] = max(float(v.abs().max()) for k, v in after.items() if "lora_B" in k)
    ema_full = ema.full_state_dict()
    res["ema_vs_ref_maxdiff"] = max(float((ema_full[k] - ref_ema[k]).abs().max()) for k in ref_ema)
    res["ema_equals_ref"] = all(torch.equal(ema_full[k], ref_ema[k]) for k in ref_ema)

    # exports: diffusers LoRA files (trained and EMA) and the merged full transformer state
    L.save_lora(model, out / "lora")
    L.save_lora(model, out / "lora_ema", ema=ema)
    merged = L.merged_state_dict(model)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in merged.items()}, str(out / "merged.safetensors"))
        save_file({k: v.contiguous() for k, v in ema_full.items()}, str(out / "ema_full.safetensors"))

    # swap_into: EMA weights inside (output = a plain model with the EMA adapters), training weights restored after
    before_swap = full_trainable(model)
    out_train = probe(model)
    with ema.swap_into(model):
        out_ema = probe(model)
        inside = full_trainable(model)
    out_again = probe(model)
    res["swap_inside_is_ema"] = all(torch.equal(inside[k], ema_full[k]) for k in ema_full)
    res["swap_restored"] = all(torch.equal(v, full_trainable(model)[k]) for k, v in before_swap.items())
    res["swap_output_restored"] = bool(torch.equal(out_train, out_again))
    res["ema_output_differs"] = float((out_train - out_ema).abs().max())
    if rank == 0:
        plain = build_transformer(model_kwargs(cfg), device="cpu")
        L.apply_lora(plain, rank=RANK_, alpha=ALPHA_)
        L.load_base_into(plain, base_before.items())
        named = dict(L.lora_parameters(plain))
        for k, v in ema_full.items():
            L._copy_full_into(named[k], v)
        res["swap_vs_plain_maxdiff"] = float((probe(plain) - out_ema).abs().max())

    # DCP: model (adapters only: frozen base left out), optimizer, EMA → a fresh model with other adapter values
    opts = StateDictOptions(ignore_frozen_params=True)
    L.reshard(model)  # after the no-grad probes, else get_optimizer_state_dict misses the unsharded params
    state = {"model": get_model_state_dict(model, options=opts), "optim": get_optimizer_state_dict(model, opt),
             "ema": ema.state_dict()}
    res["ckpt_model_keys"] = len(state["model"])
    dcp.save(state, checkpoint_id=str(out / "ckpt"))
    model2 = build(cfg, mesh, lora=True, lora_seed=5)
    opt2 = build_optimizer(L.trainable_parameters(model2), C.OptimConfig(lr=2e-3))
    ema2 = EMA(model2, decay=0.9, every=2, warmup=True)
    state2 = {"model": get_model_state_dict(model2, options=opts), "optim": get_optimizer_state_dict(model2, opt2),
              "ema": ema2.state_dict()}
    res["fresh_differs"] = not all(torch.equal(a, b) for a, b in
                                   zip(ema2.full_state_dict().values(), ema_full.values()))
    dcp.load(state2, checkpoint_id=str(out / "ckpt"))
    set_model_state_dict(model2, state2["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(model2, opt2, state2["optim"])
    ema2.load_state_dict(state2["ema"])
    e2 = ema2.full_state_dict()
    res["dcp_ema_exact"] = all(torch.equal(e2[k], ema_full[k]) for k in ema_full)
    l2 = L.lora_state_dict(model2, prefix="")
    res["dcp_lora_exact"] = all(torch.equal(l2[k], after[k]) for k in after)
    # both continue identically for a step (optimizer state restored too)
    l_a = train(model, opt, None, 1, rank)
    l_b = train(model2, opt2, None, 1, rank)
    res["resume_loss_equal"] = l_a == l_b

    # bf16 frozen base vs fp32 base, both under bf16 mixed precision: the same numerics, half the base memory
    bf = {}
    for name, dt in (("fp32", None), ("bf16", "bf16")):
        m = build(cfg_of(mp="bf16", ac="none"), mesh, lora=True, base_dtype=dt)
        o = build_optimizer(L.trainable_parameters(m), C.OptimConfig(lr=2e-3))
        bf[name] = dict(losses=train(m, o, None, 3, rank), frozen_bytes=local_bytes(m, False),
                        lora_bytes=local_bytes(m, True),
                        lora_dtypes=sorted({str(p.dtype) for p in L.trainable_parameters(m)}))
        bf[name]["lora"] = L.lora_state_dict(m, prefix="")
    res["bf16_base"] = {k: {kk: vv for kk, vv in v.items() if kk != "lora"} for k, v in bf.items()}
    res["bf16_base_same_losses"] = bf["fp32"]["losses"] == bf["bf16"]["losses"]
    res["bf16_base_same_lora"] = all(torch.equal(bf["fp32"]["lora"][k], bf["bf16"]["lora"][k]) for k in bf["fp32"]["lora"])
    return res


def run_ema(out: Path, rank: int, mesh) -> dict:
    """Full fine-tuning (every parameter trainable, root params included) with EMA."""
    res = {}
    cfg = cfg_of(ac="none")
    model = build(cfg, mesh, lora=False)
    opt = build_optimizer(model.parameters(), C.OptimConfig(lr=1e-3))
    ema = EMA(model, decay=0.8, every=2, warmup=True)
    ref = {k: v.clone() for k, v in full_trainable(model).items()}
    res["n_params"] = len(ref)
    res["uneven_shards"] = sum(1 for p in model.parameters() if p.shape[0] % 2)
    res["losses"] = train(model, opt, ema, 6, rank, ref)
    full = ema.full_state_dict()
    res["ema_equals_ref"] = all(torch.equal(full[k], ref[k]) for k in ref)
    res["ema_vs_ref_maxdiff"] = max(float((full[k] - ref[k]).abs().max()) for k in ref)
    res["ema_differs_from_params"] = not all(torch.equal(full[k], v) for k, v in full_trainable(model).items())
    # local shards only: no rank holds a full copy
    res["ema_local_numel"] = sum(v.to_local().numel() for v in ema.state_dict().values())
    res["full_numel"] = sum(v.numel() for v in full.values())
    res["all_dtensor"] = all(hasattr(v, "to_local") for v in ema.state_dict().values())
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / "ema_full.safetensors"))

    # swap_into after a no-grad forward (root, reshard_after_forward=False, stays unsharded): must still see EMA
    before = full_trainable(model)
    out_train = probe(model)
    with ema.swap_into(model):
        out_ema = probe(model)
    res["swap_restored"] = all(torch.equal(v, full_trainable(model)[k]) for k, v in before.items())
    res["swap_output_restored"] = bool(torch.equal(out_train, probe(model)))
    if rank == 0:
        plain = build_transformer(model_kwargs(cfg), device="cpu")
        plain.load_state_dict(full)
        res["swap_vs_plain_maxdiff"] = float((probe(plain) - out_ema).abs().max())
        res["train_vs_ema_output"] = float((out_train - out_ema).abs().max())

    # uneven shards (5 rows over 2 ranks: 3 + 2) on a toy module, the same check
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    toy = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    fully_shard(toy, mesh=mesh)
    sgd = torch.optim.SGD(toy.parameters(), lr=0.1)
    toy_ema = EMA(toy, decay=0.7, every=1)
    toy_ref = {k: v.clone() for k, v in full_trainable(toy).items()}
    res["toy_uneven_local_rows"] = [p.to_local().shape[0] for p in toy.parameters()]
    for step in range(1, 5):
        toy(torch.randn(4, 7, generator=torch.Generator().manual_seed(rank * 10 + step))).square().mean().backward()
        sgd.step()
        sgd.zero_grad()
        toy_ema.update(toy, step)
        cur = full_trainable(toy)
        for k in toy_ref:
            toy_ref[k] = toy_ref[k].lerp(cur[k], 1.0 - 0.7)
    tf = toy_ema.full_state_dict()
    res["toy_uneven_exact"] = all(torch.equal(tf[k], toy_ref[k]) for k in toy_ref)

    # DCP round trip, in place into a fresh EMA (of other values)
    dcp.save({"ema": ema.state_dict()}, checkpoint_id=str(out / "ckpt"))
    opt.step()  # move the parameters on, so that a fresh EMA differs
    for p in model.parameters():
        with torch.no_grad():
            p.add_(1.0)
    ema2 = EMA(model, decay=0.8, every=2, warmup=True)
    state = {"ema": ema2.state_dict()}
    dcp.load(state, checkpoint_id=str(out / "ckpt"))
    ema2.load_state_dict(state["ema"])
    f2 = ema2.full_state_dict()
    res["dcp_exact"] = all(torch.equal(f2[k], full[k]) for k in full)
    # and from full tensors (a 1-process export, say): each rank keeps its slice
    ema3 = EMA(model, decay=0.8)
    ema3.load_state_dict(full)
    res["full_load_exact"] = all(torch.equal(v, full[k]) for k, v in ema3.full_state_dict().items())
    return res


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = run_lora(out, rank, mesh) if mode == "lora" else run_ema(out, rank, mesh)
    res["wall_s"] = time.perf_counter() - t0
    if rank == 0:
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
