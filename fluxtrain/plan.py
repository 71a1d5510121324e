"""`fluxtrain plan`: predicted per-GPU peak memory of a config, and the fastest config that fits.

The model: what stays resident (fp32 params and AdamW m and v, 12 B/param, divided by the shard group), FSDP's
unsharded block buffers (bf16 params of the running block plus prefetched ones), the frozen encoders when they run
online, a fixed allocator/NCCL overhead, and the larger of two things that trade places during the backward: the saved
activations (all alive when the backward starts, freed block by block) and the sharded fp32 gradients (none when it
starts, all at its end). With gradient accumulation the gradients live through the next micro-batch's forward, so
the two add. Activations per sample are proportional to layers × tokens × width, with a bytes-per-element factor per
AC mode calibrated from the 12B runs in bench/RESULTS.md.

LoRA (`lora.enabled`): the frozen base in `lora.base_dtype` sharded, the adapters' fp32 params and AdamW states
sharded, their gradients as above. ITC (`train.itc_weight` > 0) doubles the activations: its forward is one batch of
the samples and their empty-prompt copies (the tiny model's saved tensors agree: tests/test_plan.py). The same activation factors fit LoRA's measured peaks (50.0 GiB on 1 GPU and
38.8 GiB on 2 GPUs without AC): what looked like an extra bf16 copy of the base was the no-AC activations, 27.8 GiB
per 1024² sample in full fine-tuning and in LoRA alike.

CPU offload: the states live on the host; the GPU holds the live blocks' fp32 shards copied in for the all-gather and
the running block's sharded fp32 gradient on its way out (calibrated on the one measured row: 4.0 GiB, 2 × H200).
Optimizer offload (`parallel.optimizer_offload`): only AdamW's m and v (8 B/param) leave the GPU; they stream through
a ring on the GPU of `parallel.optimizer_offload_buffer_gib`, at least two of the largest block's sharded m and v.
With `parallel.optimizer_offload_dtype = "bf16"` the moments cross in bf16 through a bf16 twin of the ring (6 B per
ring element instead of 4). `recommend` gives the ring whatever memory is left: the more of the next step's moments it holds, the fewer copies
the forward waits for.

Host memory (`host_gib`, per GPU; a node holds its GPUs' shares): what offload pins (CPU offload: the states and
gradients; optimizer offload: the moments, 8 or 4 B/param) plus an async checkpoint's host copy of the state
(`checkpoint.async_save`: parameters and moments, pinned with background staging, pageable otherwise). Given the
node's memory, `recommend` keeps that under HOST_MARGIN of it: fp32 moments on the host first (exact AdamW), bf16
ones where fp32 don't fit, then CPU offload; and where only a synchronous save fits, it says so.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from fluxtrain import config as C
from fluxtrain.argtypes import positive_float, positive_int
from fluxtrain.models.presets import transformer_kwargs

GIB = 2**30
# Activation bytes per (sample · layer · token · hidden unit), bf16, measured on flux-dev 1024² (2 × H200):
# (peak − resident − buffers − overhead) / (batch · 57 · 4608 · 3072), from rows where the activations outweigh the
# gradients. Keys: (AC mode, compiled).
ACT_BYTES = {
    ("none", False): 69.8,
    ("none", True): 37.0,  # full fine-tune 37.4 / 36.7 (LoRA's two rows, predicted with it: +4.4% / +5.1%)
    ("every2", False): 60.1,
    ("every2", True): 19.8,
    ("ops", True): 20.9,  # batch 2 and 3 alike
    # 1 H200, flux-dev's width at a third of its depth (6 + 12 blocks), batch 2: 31.4 / 31.4 / 31.2 from three rows
    # (offloaded bf16 and fp32 moments, resident; bench/RESULTS.md, twelfth session). Was 41.8, assumed, not measured
    ("ops", False): 31.3,
    # Full AC keeps only block inputs: its 12B rows are gradient-bound, so they can't fix these two; the earlier fit's
    # values predict the rows where they count (offload, LoRA full AC) within 3%.
    ("full", False): 1.08,
    ("full", True): 0.93,
}
OVERHEAD_GIB = 0.25
# The share of a node's memory the planner lets pinned and staged state take: the OS, the data loader's workers and
# the processes themselves live in the rest.
HOST_MARGIN = 0.8
# Fastest first, from the measured MFU ranking (op-level SAC + compile at batch 2 was best).
SPEED_ORDER = [("ops", True), ("none", True), ("every2", True), ("full", True), ("none", False), ("every2", False),
               ("full", False)]
ENCODER_PARAMS = {"flux-dev": 4.76e9 + 0.123e9 + 0.084e9, "flux-schnell": 4.76e9 + 0.123e9 + 0.084e9, "tiny": 0.5e6}


@dataclass
class Plan:
    states_gib: float  # resident all step: parameters and optimizer states
    grads_gib: float
    buffers_gib: float
    activations_gib: float
    encoders_gib: float
    overhead_gib: float
    accumulates: bool = False  # gradients kept across micro-batches
    host_gib: float = 0.0  # host memory per GPU: offloaded state and gradients
    staging_gib: float = 0.0  # host memory per GPU: an async checkpoint's copy of the state (0 for sync saves)

    @property
    def host_total_gib(self) -> float:
        return self.host_gib + self.staging_gib

    @property
    def total_gib(self) -> float:
        backward = (self.activations_gib + self.grads_gib if self.accumulates
                    else max(self.activations_gib, self.grads_gib))
        return self.states_gib + self.buffers_gib + backward + self.encoders_gib + self.overhead_gib


def ac_key(cfg: C.Config) -> str:
    p = cfg.parallel
    if p.activation_checkpointing == "selective":
        return "ops" if p.ac_ops else ("full" if p.ac_every == 1 else "every2")
    return p.activation_checkpointing


def predict(cfg: C.Config, gpus: int, kw: dict | None = None) -> Plan:
    kw = kw or transformer_kwargs(cfg.model.preset)
    from fluxtrain.models.flux import build_transformer
    from fluxtrain.parallel.optimizer_offload import MOMENT_DTYPES, ring_elem_bytes, ring_elems

    m = build_transformer(kw, "meta")
    n = sum(p.numel() for p in m.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in list(m.transformer_blocks) + list(m.single_transformer_blocks))
    p = cfg.parallel
    shard = {"NO_SHARD": 1, "HYBRID_SHARD": p.shard_size or min(gpus, 8)}.get(p.strategy, gpus)
    states, grads = 12 * n / shard, 4 * n / shard
    trained = n  # parameters with AdamW moments
    host = 0.0
    lc = cfg.lora
    if lc.enabled:
        from fluxtrain import lora

        lora.apply_lora(m, lc.rank, lc.alpha, 0.0, lc.targets or lora.DEFAULT_TARGETS, lc.init, None)
        adapters = sum(q.numel() for q in m.parameters()) - n
        base_bytes = 2 if lc.base_dtype == "bf16" else 4
        states, grads = (base_bytes * n + 12 * adapters) / shard, 4 * adapters / shard
        trained = adapters
    saved = states  # what a checkpoint copies: parameters and moments, as they are kept
    if p.cpu_offload:
        host, states, grads = states + grads, 0.0, 0.0
    if p.optimizer_offload:
        states -= 8 * trained / shard
        host = 2 * MOMENT_DTYPES[p.optimizer_offload_dtype].itemsize * trained / shard
        saved = states + host
    staging = saved if cfg.checkpoint.async_save else 0.0
    pbytes = 2 if p.mixed_precision == "bf16" else 4
    live_blocks = 1 + max(p.forward_prefetch, p.backward_prefetch)
    buffers = block * pbytes * live_blocks  # gathered params of the running and the prefetched block
    if p.cpu_offload:
        buffers += block * 4 / shard * (live_blocks + 1)
    if p.optimizer_offload:
        dt = MOMENT_DTYPES[p.optimizer_offload_dtype]  # the ring the optimizer allocates, at least two blocks' shards
        buffers += ring_elems([block / shard], p.optimizer_offload_buffer_gib * GIB, dt) * ring_elem_bytes(dt)
    if p.strategy == "SHARD_GRAD_OP":
        buffers += n * pbytes  # parameters stay gathered between forward and backward
    d = kw["num_attention_heads"] * kw["attention_head_dim"]
    lat = cfg.data.resolution // 8
    tokens = (lat // 2) ** 2 + cfg.model.max_text_tokens
    layers = kw["num_layers"] + kw["num_single_layers"]
    key = (ac_key(cfg), cfg.train.compile)
    # ITC runs the batch and its empty-prompt copy through the model as one batch of 2B (itc.ITCObjective.forward)
    samples = cfg.train.batch_size * (2 if cfg.train.itc_weight > 0 else 1)
    act = samples * layers * tokens * d * ACT_BYTES[key] * (2 if pbytes == 4 else 1)
    if p.fp8 and p.fp8_recipe == "tensorwise_saved" and key[0] == "ops":
        # op-level AC then also keeps the linears' fp8 inputs, 1 byte an element (_policy_fp8_casts): in units of d
        # per token, 9 per double block (q, k, v, out, ff in, ff out (4d), on each stream) and 9 per single block
        # (q, k, v, mlp, out (5d)) eagerly; compiled, q/k/v(/mlp) share one cast (inductor's CSE): 7 and 6. Both are
        # the bytes diffusers' blocks keep (tests/parallel/test_fp8.py) and, compiled, the step's peak on an H200
        # within 0.7% (tests/test_plan.py: THIRD_DEPTH_FP8).
        wd, ws = (7, 6) if cfg.train.compile else (9, 9)
        act += samples * tokens * d * (kw["num_layers"] * wd + kw["num_single_layers"] * ws)
    enc = 0.0 if cfg.data.source == "cache" else ENCODER_PARAMS.get(cfg.model.preset, 0) * 2
    return Plan(states / GIB, grads / GIB, buffers / GIB, act / GIB, enc / GIB, OVERHEAD_GIB, cfg.train.grad_accum > 1,
                host / GIB, staging / GIB)


def _with(cfg: C.Config, **over) -> C.Config:
    raw = C.to_dict(cfg)
    for dotted, v in over.items():
        sec, key = dotted.split(".")
        raw.setdefault(sec, {})[key] = v
    return C.from_dict(raw)


def recommend(cfg: C.Config, gpus: int, gpu_mem_gib: float, margin: float = 0.92, host_mem_gib: float | None = None,
              gpus_per_node: int | None = None) -> tuple[C.Config, Plan] | None:
    """The fastest (AC mode, compile, offload) that fits `margin` of the GPU memory, or None. Offload is the last
    resort, the optimizer moments alone first (their copies hide behind the forward), in bf16 where the node's
    memory (`host_mem_gib`, if given) can't hold them in fp32, then everything."""
    modes = {"ops": dict(activation_checkpointing="selective", ac_ops=True),
             "every2": dict(activation_checkpointing="selective", ac_ops=False, ac_every=2),
             "none": dict(activation_checkpointing="none"), "full": dict(activation_checkpointing="full")}
    for opt_off, dtype, offload in ((False, "fp32", False), (True, "fp32", False), (True, "bf16", False),
                                    (False, "fp32", True)):
        for mode, compiled in SPEED_ORDER:
            over = {f"parallel.{k}": v for k, v in modes[mode].items()}
            cand = _with(cfg, **over, **{"train.compile": compiled, "parallel.cpu_offload": offload,
                                         "parallel.optimizer_offload": opt_off,
                                         "parallel.optimizer_offload_dtype": dtype})
            plan = predict(cand, gpus)
            if plan.total_gib > margin * gpu_mem_gib:
                continue
            held = _on_the_host(cand, plan, gpus, host_mem_gib, gpus_per_node)
            if held is None:
                break  # the same host memory for every AC mode: the next kind of offload
            if held is not cand:  # synchronous saves: no staged copy
                cand, plan = held, predict(held, gpus)
            cand, plan = _fp8_inputs_kept(cand, plan, gpus, margin * gpu_mem_gib)
            return _bigger_ring(cand, plan, gpus, margin * gpu_mem_gib) if opt_off else (cand, plan)
    return None


def on_node(gpus: int, gpus_per_node: int | None) -> int:
    """GPUs on one node: all of them up to 8, unless told."""
    return min(gpus, gpus_per_node or 8)


def node_gib(host_gib: float, gpus: int, gpus_per_node: int | None) -> float:
    """A node's share of per-GPU host memory: its GPUs'."""
    return host_gib * on_node(gpus, gpus_per_node)


def _on_the_host(cfg: C.Config, plan: Plan, gpus: int, host_mem_gib: float | None,
                 gpus_per_node: int | None) -> C.Config | None:
    """cfg if the node holds what it puts on the host; with synchronous checkpoint saves if only those fit; else None."""
    if host_mem_gib is None:
        return cfg
    budget = HOST_MARGIN * host_mem_gib
    if node_gib(plan.host_total_gib, gpus, gpus_per_node) <= budget:
        return cfg
    if node_gib(plan.host_gib, gpus, gpus_per_node) <= budget:
        return _with(cfg, **{"checkpoint.async_save": False})
    return None


def _fp8_inputs_kept(cfg: C.Config, plan: Plan, gpus: int, budget_gib: float) -> tuple[C.Config, Plan]:
    """fp8 tensorwise under op-level AC as tensorwise_saved where its kept fp8 inputs fit: the same gradients, 1.04×
    the samples/s (bench/RESULTS.md, fifteenth session)."""
    if not (cfg.parallel.fp8 and cfg.parallel.fp8_recipe == "tensorwise" and ac_key(cfg) == "ops"):
        return cfg, plan
    cand = _with(cfg, **{"parallel.fp8_recipe": "tensorwise_saved"})
    saved = predict(cand, gpus)
    return (cand, saved) if saved.total_gib <= budget_gib else (cfg, plan)


def _bigger_ring(cfg: C.Config, plan: Plan, gpus: int, budget_gib: float) -> tuple[C.Config, Plan]:
    """The offloaded moments' ring grown in whole GiB into the memory left under the budget."""
    ring = plan.buffers_gib - predict(_with(cfg, **{"parallel.optimizer_offload": False,
                                                    "parallel.optimizer_offload_dtype": "fp32"}), gpus).buffers_gib
    grown = int(ring + budget_gib - plan.total_gib)
    if grown <= ring:
        return cfg, plan
    cand = _with(cfg, **{"parallel.optimizer_offload_buffer_gib": float(grown)})
    return cand, predict(cand, gpus)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fluxtrain plan")
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=positive_int, required=True)
    ap.add_argument("--gpu-mem-gib", type=positive_float, required=True)
    ap.add_argument("--host-mem-gib", type=positive_float, default=None,
                    help="a node's memory: the recommendation keeps offloaded and staged state within it")
    ap.add_argument("--gpus-per-node", type=positive_int, default=None, help="default: all GPUs, up to 8")
    a, rest = ap.parse_known_args(argv)
    cfg = C.load(a.config, rest)
    C.validate_world(cfg, a.gpus, on_node(a.gpus, a.gpus_per_node))  # what train would refuse is not "fits"
    plan = predict(cfg, a.gpus)
    print(f"{cfg.model.preset}, {a.gpus} GPUs × {a.gpu_mem_gib:g} GiB, {cfg.parallel.strategy}, AC "
          f"{ac_key(cfg)}, compile {cfg.train.compile}, batch {cfg.train.batch_size}/GPU at {cfg.data.resolution}²")
    for k in ("states_gib", "grads_gib", "buffers_gib", "activations_gib", "encoders_gib", "overhead_gib"):
        print(f"  {k[:-4]:<12} {getattr(plan, k):8.1f} GiB")
    print("  (the peak counts " + ("activations + gradients: grad_accum keeps gradients across micro-batches)"
                                   if plan.accumulates else
                                   "the larger of activations and gradients: the backward frees one as it makes the other)"))
    fits = plan.total_gib <= a.gpu_mem_gib
    print(f"  {'total':<12} {plan.total_gib:8.1f} GiB per GPU — {'fits' if fits else 'does NOT fit'}")
    node = node_gib(plan.host_total_gib, a.gpus, a.gpus_per_node)
    print(f"  host         {plan.host_gib:8.1f} GiB per GPU offloaded + {plan.staging_gib:.1f} staged by async checkpoint "
          f"saves = {node:.1f} GiB per node of {on_node(a.gpus, a.gpus_per_node)} GPUs"
          + ("" if a.host_mem_gib is None else
             f" — {'fits' if node <= HOST_MARGIN * a.host_mem_gib else 'does NOT fit'} {HOST_MARGIN:.0%} of "
             f"{a.host_mem_gib:g} GiB"))
    rec = recommend(cfg, a.gpus, a.gpu_mem_gib, host_mem_gib=a.host_mem_gib, gpus_per_node=a.gpus_per_node)
    if rec is None:
        print("nothing fits: add GPUs or host memory, lower train.batch_size or data.resolution, or use data.source = cache")
        return 1
    best, bp = rec
    p = best.parallel
    print(f"fastest that fits: --parallel.activation_checkpointing {p.activation_checkpointing}"
          + (" --parallel.ac_ops true" if p.ac_ops and p.activation_checkpointing == "selective" else "")
          + f" --train.compile {str(best.train.compile).lower()} --parallel.cpu_offload {str(p.cpu_offload).lower()}"
          + (f" --parallel.optimizer_offload true --parallel.optimizer_offload_buffer_gib {p.optimizer_offload_buffer_gib:g}"
             if p.optimizer_offload else "")
          + (" --parallel.optimizer_offload_dtype bf16" if p.optimizer_offload_dtype == "bf16" else "")
          + (" --checkpoint.async_save false" if cfg.checkpoint.async_save and not best.checkpoint.async_save else "")
          + f"  ({bp.total_gib:.1f} GiB; host {node_gib(bp.host_total_gib, a.gpus, a.gpus_per_node):.1f} "
          f"GiB per node)")
    if p.optimizer_offload and p.optimizer_offload_dtype == "fp32":
        # exact AdamW comes first; where the copies outlast the step, bf16 moments are the faster choice
        print("  faster where the moments' copies outlast the step: --parallel.optimizer_offload_dtype bf16, half the "
              "host bytes and copies, rounded stochastically (not exact AdamW); 12B on one H200: 1.57 against 2.81 s "
              "per step (bench/RESULTS.md)")
    return 0
