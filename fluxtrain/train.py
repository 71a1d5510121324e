"""The training loop: data → encode → noise → forward → loss → backward (accumulated) → clip → step → log."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fluxtrain import config as C
from fluxtrain import flow, rng
from fluxtrain.checkpoint import Checkpointer, find_resume, set_aside_earlier, set_aside_later
from fluxtrain.data.loader import build_loader
from fluxtrain.metrics import MetricsWriter, Throughput, flux_flops_per_sample, memory_stats, setup_logging
from fluxtrain.models.setup import build_training_model, encoders_folder, model_kwargs
from fluxtrain.optim import build_optimizer, build_scheduler, flush
from fluxtrain.parallel import after_optimizer_step, set_cpu_threads, set_matmul_precision, wants_fsdp
from fluxtrain.parallel import mesh as pmesh
from fluxtrain.parallel.attention import resolve_backend
from fluxtrain.profiler import StepProfiler
from fluxtrain.progress import Progress
from fluxtrain.sample import text_length_warning


class NonFiniteError(RuntimeError):
    pass


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A batch's host tensor to the GPU without waiting there: a copy from pageable memory makes the host wait for
    all the work queued before it (the last step's), a pinned one does not (PyTorch's pinned-memory cache keeps the
    buffer until its copy is done)."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def sample_noise(indices: torch.Tensor, seed: int, lat_shape, image_seq_len: int, tc: C.TrainConfig,
                 drop_p: float, device=None):
    """Per-sample randomness from (seed, global sample index), counter-based (fluxtrain/rng.py): the same draws
    whatever the world size or batch split, drawn on `device` in a few vectorised ops. Returns (posterior
    noise, flow noise, σ, caption-dropout mask)."""
    n, b = math.prod(lat_shape), len(indices)
    idx = indices if device is None else to_device(indices, device)  # once for the four draws, without a wait
    post = rng.normal(seed, idx, 0, n, device).view(b, *lat_shape)
    eps = rng.normal(seed, idx, 1, n, device).view(b, *lat_shape)
    z = rng.normal(seed, idx, 2, 1, device)[:, 0]
    u = rng.uniform(seed, idx, 3, 2, device).float()
    sigma = flow.sigmas_from_draws(z, u[:, 0], image_seq_len, tc.timestep_sampling, logit_mean=tc.logit_mean,
                                   logit_std=tc.logit_std, mode_scale=tc.mode_scale, shift=tc.shift)
    return post, eps, sigma, u[:, 1] < drop_p


class Encoders:
    """Frozen encoders on this rank's device: prompts → (T5 seq, CLIP pooled), images → latents.

    With `data.source = cache` the batches already hold latents and embeddings: the encoders are then loaded only
    when a sample grid needs them, and the empty prompt comes from the cache."""

    def __init__(self, cfg: C.Config, device: torch.device, data=None):
        self.cfg, self.device = cfg, device
        self.cache = data if cfg.data.source == "cache" else None
        self._text = self._vae = self._empty = None
        vae_cfg = json.loads((encoders_folder(cfg) / "vae" / "config.json").read_text())
        self.downsample = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        if self.cache is None:
            self._load()

    def _load(self) -> None:
        from fluxtrain.models.encoders import Autoencoder, TextEncoders

        folder, dev = encoders_folder(self.cfg), self.device
        dt = torch.bfloat16 if (dev.type == "cuda" and self.cfg.parallel.mixed_precision == "bf16") else torch.float32
        self._text = TextEncoders(folder, max_tokens=self.cfg.model.max_text_tokens, dtype=dt).to(dev)
        self._vae = Autoencoder(folder, dtype=dt).to(dev)

    @property
    def text(self):
        if self._text is None:
            self._load()
        return self._text

    @property
    def vae(self):
        if self._vae is None:
            self._load()
        return self._vae

    def inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """(latent mean, latent std, T5 seq, CLIP pooled) of a batch, from the cache or the encoders."""
        if "latent_mean" in batch:
            keys = ("latent_mean", "latent_std", "seq", "pooled")
            return tuple(to_device(batch[k], self.device).float() for k in keys)
        seq, pooled = self.text(batch["captions"])
        mean, std = self.vae.moments(to_device(batch["pixels"], self.device))
        return mean, std, seq, pooled

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's (seq, pooled), made once: every step with caption dropout or ITC asks for it (it read
        the cache's file, or ran the text encoders, each time)."""
        if self._empty is None:
            if self.cache is not None:
                self._empty = tuple(t.to(self.device).float() for t in self.cache.empty_prompt())
            else:
                self._empty = self.text([""])
        return self._empty


def forward_backward(model, enc: Encoders, batch: dict, cfg: C.Config, device, step: int, rank: int,
                     loss_scale: float, itc=None) -> torch.Tensor:
    """One micro-batch: the model-specific part of training. Returns the (unscaled) loss."""
    tc = cfg.train
    if tc.compile and tc.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last step's graph outputs may be reused
    mean, std, seq, pooled = enc.inputs(batch)
    lat_h, lat_w = mean.shape[-2:]
    seq_len = (lat_h // 2) * (lat_w // 2)
    post, eps, sigma, drop = sample_noise(batch["indices"], tc.seed, tuple(mean.shape[1:]), seq_len, tc,
                                          cfg.data.caption_dropout, device)
    caption_pooled = pooled
    if cfg.data.caption_dropout > 0 or itc is not None:
        e_seq, e_pooled = enc.empty()
    if cfg.data.caption_dropout > 0:  # classifier-free guidance: the empty prompt's embeddings for dropped captions
        seq = torch.where(drop[:, None, None], e_seq.expand_as(seq), seq)
        pooled = torch.where(drop[:, None], e_pooled.expand_as(pooled), pooled)
    x0 = flow.pack(mean.float() + std.float() * post)
    noise = flow.pack(eps)
    x_t = flow.noisy_input(x0, noise, sigma)
    guidance = cfg.model.guidance if model.config.guidance_embeds else None
    inputs = flow.transformer_inputs(x_t, sigma, seq, pooled, lat_h, lat_w, guidance)
    if itc is None:
        pred, aux = model(**inputs)[0], 0.0
    else:  # + the image-text contrastive loss, from the same forward (the logged loss stays the flow loss)
        view = None
        if tc.itc_sigma_scale < 1:  # its copy of the batch at a lower noise level, where the caption can be read
            s = sigma * tc.itc_sigma_scale
            view = dict(hidden_states=flow.noisy_input(x0, noise, s).to(x_t.dtype),
                        timestep=s.to(device, torch.float32))
        pred, aux = itc.forward(model, inputs, e_seq, e_pooled, caption_pooled, view)
    loss = flow.flow_loss(pred, flow.target(x0, noise), sigma, tc.loss_weighting)
    if tc.inject_nan_at_step == step and rank == tc.inject_nan_rank:
        loss = loss * float("nan")  # test hook: a NaN on one rank only
    ((loss + aux) * loss_scale).backward()
    return loss.detach()


def data_counts(data, cfg: C.Config) -> dict[str, int]:
    """The loaders' counters for the metrics row, summed over the ranks (rank 0 writes the row, and another rank's
    shards may hold the bad samples): samples skipped as unreadable and, with data.caption_augment, samples that kept
    their own caption for want of scene metadata (loaders without the counters report 0). Collective."""
    row = {"data_skipped": getattr(data, "skipped", 0)}
    if cfg.data.caption_augment > 0:
        row["captions_without_scene"] = getattr(data, "no_scene", 0)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(list(row.values()), dtype=torch.int64)  # on the CPU: through gloo beside nccl
        dist.all_reduce(t)
        row = dict(zip(row, t.tolist()))
    return row


class QueuedStep:
    """An optimizer step queued on the device, and what the host does once it reads its gradient norm (`settle`).

    A plain fused AdamW skips a non-finite step by itself (`skip`, the device flag its kernel reads), so the host
    need not wait for the norm before it queues the next step's forward and backward: the EMA update, the
    non-finite count and the logged norm wait for `settle()`. Waiting every step left the GPU idle while the host
    queued the next step (a small model's step is as much host time as GPU time). `settle()` must run before the
    next optimizer step is queued: the EMA reads this step's weights. Other optimizers are settled at once."""

    def __init__(self, step: int, read=None, skip=None, ema=None, model=None, done: tuple[float, bool] | None = None):
        self.step, self._read, self.skip, self._ema, self._model, self._done = step, read, skip, ema, model, done
        self.lagged = done is None

    def settle(self) -> tuple[float, bool]:
        """(gradient norm, finite): reads the norm (its copy started when the step was queued) and, if finite,
        folds this step's weights into the EMA. Once."""
        if self._done is None:
            norm = self._read()
            ok = math.isfinite(norm)
            if ok and self._ema is not None:
                self._ema.update(self._model, self.step)
            self._done = (norm, ok)
        return self._done


def queue_step(model, opt, sched, max_norm: float, cfg: C.Config, ema=None, step: int = 0) -> QueuedStep:
    """Clip over the sharded gradients and step; a non-finite norm skips the step on every rank alike (the norm is
    global). A fused optimizer takes both into its kernel: the clip coefficient as `grad_scale` (no extra read and
    write of every gradient) and the skip as `found_inf` (GradScaler's route: no update, step count kept), so the
    host queues the step without waiting for the norm (QueuedStep)."""
    total = grad_norm(model)
    if opt.defaults.get("fused"):
        # torch.nn.utils.clip_grads_with_norm_'s coefficient, min(1, max_norm / (total + 1e-6)), inverted
        opt.grad_scale = torch.clamp((total + 1e-6) / max_norm, min=1.0) if max_norm > 0 else None
        opt.found_inf = (~torch.isfinite(total)).float()
        read = _copy_to_host(total)
        opt.step()
        if not hasattr(opt, "flush"):  # not offloaded: nothing else reads the weights before the next forward
            after_optimizer_step(model, cfg)  # (fp8 scales: a skipped step's unchanged weights give the same ones)
            opt.zero_grad(set_to_none=True)
            sched.step()
            return QueuedStep(step, read, opt.found_inf, ema, model)
        norm = read()
    else:
        norm = float(total)
        if math.isfinite(norm):
            if max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None],
                                                     max_norm, total, foreach=True)
            opt.step()
    ok = math.isfinite(norm)
    if ok:
        if ema is not None or (cfg.parallel.fp8 and cfg.parallel.fp8_all_gather):
            flush(opt, host=False)  # both read the weights outside a forward (fp8: after_optimizer_step's scales)
        after_optimizer_step(model, cfg)
        if ema is not None:
            ema.update(model, step)
    opt.zero_grad(set_to_none=True)
    sched.step()
    return QueuedStep(step, skip=not ok, done=(norm, ok))


def clip_and_step(model, opt, sched, max_norm: float, cfg: C.Config, ema=None, step: int = 0) -> tuple[float, bool]:
    """queue_step, settled at once: (gradient norm, whether the step was taken)."""
    return queue_step(model, opt, sched, max_norm, cfg, ema, step).settle()


def grad_norm(model) -> torch.Tensor:
    """Global gradient norm with one reduction (DTensor partial norms made full once), left on the device."""
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None], foreach=True)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return total.detach().float()


def _copy_to_host(t: torch.Tensor):
    """Start a scalar's copy to the host now; the returned reader waits for that copy only, not for work queued
    after it (a plain float() would also wait for the optimizer step)."""
    if t.device.type != "cuda":
        return lambda: float(t)
    buf = torch.empty((), dtype=t.dtype, pin_memory=True)
    buf.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return lambda: (done.synchronize(), float(buf))[1]


def mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().float().clone()
    if dist.get_world_size() == 1:
        return float(x)
    dist.all_reduce(x)
    return float(x) / dist.get_world_size()


def train(cfg: C.Config) -> dict:
    D = pmesh.init(cfg)
    run_dir = Path(cfg.train.output_dir)
    if D.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        C.save(cfg, run_dir / "config.toml")
    dist.barrier()
    log = setup_logging(run_dir, D.rank)
    try:
        out = _train(cfg, D, run_dir, log)
    except BaseException as err:
        # no closing barrier: the peers may wait in a collective this rank never joins (its data slot ran dry), and
        # would hold it until the timeout; exiting lets torchrun stop them at once
        pmesh.teardown(D.owns_group, wait_for_peers=False)
        if D.world_size > 1 and pmesh.peer_gone(err):
            log.info(f"rank {D.rank} stopped: another rank failed first ({type(err).__name__}: {str(err)[:200]})")
            raise pmesh.PeerFailed(f"rank {D.rank} stopped: another rank failed first") from err
        if isinstance(err, Exception):
            log.error(f"rank {D.rank} failed: {type(err).__name__}: {err}")
        raise
    pmesh.teardown(D.owns_group)
    return out


def _train(cfg: C.Config, D: pmesh.Dist, run_dir: Path, log) -> dict:
    tc = cfg.train
    torch.manual_seed(tc.seed)
    sharding = cfg.parallel.strategy if wants_fsdp(D.mesh, cfg) else "unsharded (one process, fp32: no FSDP)"
    set_matmul_precision(D.device, cfg.parallel.tf32)
    threads = set_cpu_threads(cfg)
    tf32 = " (TF32 matmuls)" if D.device.type == "cuda" and cfg.parallel.tf32 else ""
    log.info(f"world {D.world_size} on {D.device}, {sharding}, {cfg.parallel.mixed_precision}{tf32}, "
             f"AC {cfg.parallel.activation_checkpointing}, offload {cfg.parallel.cpu_offload} "
             f"(optimizer moments only: {cfg.parallel.optimizer_offload}) "
             f"({threads} CPU threads), attention "
             f"{resolve_backend(cfg.model.attention_backend, D.device.type, cfg.parallel.mixed_precision)}")
    if D.is_main and (warning := text_length_warning(cfg)):
        log.warning(warning)
    model = build_training_model(cfg, D.mesh, D.device)
    opt = build_optimizer(model.parameters(), cfg.optim, model if cfg.parallel.optimizer_offload else None, cfg.parallel)
    sched = build_scheduler(opt, tc.steps, cfg.optim)
    data = build_loader(cfg, D.rank, D.world_size)
    enc = Encoders(cfg, D.device, data)
    ema = None
    if cfg.ema.enabled:
        from fluxtrain.ema import EMA

        ema = EMA(model, cfg.ema.decay, cfg.ema.every, cfg.ema.warmup)
    itc = None
    if tc.itc_weight > 0:
        from fluxtrain.itc import ITCObjective

        itc = ITCObjective(model, D.mesh, model.config.pooled_projection_dim, tc.itc_weight, cfg.optim, tc.steps,
                           D.device)
    start, counters = 0, {"nonfinite_total": 0, "samples_seen": 0}
    if cfg.checkpoint.resume == "never":  # this run's checkpoints alone in its folder (an earlier run's moved aside)
        if (earlier := set_aside_earlier(run_dir, cfg.checkpoint.dir, D.is_main)) and D.is_main:
            log.warning(f"checkpoint.resume = never: moved {earlier[0]} checkpoints of an earlier run to {earlier[1]}")
        dist.barrier()  # no rank writes a checkpoint folder before the main one has moved the old one
    resume = find_resume(run_dir, cfg.checkpoint.resume, cfg.checkpoint.dir)
    # a fresh start replaces an old metrics.jsonl; a resume appends to it
    metrics = MetricsWriter(run_dir, D.is_main, cfg.log.trackers, C.to_dict(cfg), cfg.log.wandb_project,
                            append=resume is not None)
    ckpt = Checkpointer(run_dir, cfg.checkpoint, D.rank, D.world_size, D.device, log,
                        extras={"itc": (itc.head, itc.opt)} if itc else None, trainable_only=cfg.lora.enabled,
                        ema=ema, metrics=metrics)
    if resume is not None:
        extra = ckpt.load(resume, model, opt, sched)
        start = int(extra["step"])
        counters.update({k: extra[k] for k in counters if k in extra})
        if "data" in extra and not extra["resharded"]:
            data.load_state_dict(extra["data"])
        elif "data" in extra:
            data.load_state_dict(_reshard_data_state(extra["data"]))
        log.info(f"resumed from {resume} at step {start}" + (" (world size changed: data position kept by "
                 "global sample count, RNG reseeded)" if extra["resharded"] else ""))
        changed = _config_changes(resume, cfg)
        if changed:
            log.info(f"settings changed since the checkpoint ({len(changed)}): " + "; ".join(changed[:12])
                     + ("; …" if len(changed) > 12 else ""))
        if start >= tc.steps:
            log.warning(f"the checkpoint is at step {start}, at or past train.steps = {tc.steps}: nothing to train; "
                        f"raise --train.steps to continue")
        metrics.event(start, "resume", path=str(resume), resharded=extra["resharded"])
        if (later := set_aside_later(run_dir, cfg.checkpoint.dir, start, D.is_main)) and D.is_main:
            log.warning(f"resumed at step {start} before this run's later checkpoints: moved {later[0]} of them to "
                        f"{later[1]}, so that they are neither kept over this run's nor resumed from")
        dist.barrier()  # no rank saves into the folder before the main one has moved them

    stop = {"signal": None}
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda num, _f: stop.update(signal=num))

    prof = StepProfiler(cfg.log, run_dir, D.rank, start_step=start)
    lat = cfg.data.resolution // enc.downsample
    tokens = (lat // 2) ** 2 + cfg.model.max_text_tokens
    thr = Throughput(flux_flops_per_sample(model_kwargs(cfg), (lat // 2) ** 2, cfg.model.max_text_tokens),
                     tokens, D.world_size, D.device)
    progress = Progress(cfg.log.progress, tc.steps, start, enabled=D.is_main)
    nonfinite_run, loss_val, gnorm, ok = 0, float("nan"), float("nan"), True
    pending: QueuedStep | None = None  # the last optimizer step, its norm not read yet
    settle_now = os.environ.get("FLUXTRAIN_TEST_SETTLE_EVERY_STEP") == "1"  # test hook: the reference schedule

    def settle() -> None:
        """The pending step's norm read (at most a step late): its EMA update, the non-finite count."""
        nonlocal pending, gnorm, ok, nonfinite_run
        if pending is None:
            return
        (gnorm, ok), at, pending = pending.settle(), pending.step, None
        if ok:
            nonfinite_run = 0
            return
        nonfinite_run += 1
        counters["nonfinite_total"] += 1
        log.warning(f"step {at}: non-finite gradient norm ({gnorm}); optimizer step skipped on every rank")
        metrics.event(at, "nonfinite", grad_norm=str(gnorm), total=counters["nonfinite_total"])
        if nonfinite_run >= tc.max_nonfinite_steps:
            raise NonFiniteError(f"{nonfinite_run} non-finite steps in a row (train.max_nonfinite_steps): "
                                 f"lower optim.lr or check the data; resume from the last checkpoint")

    step, stopping = start, False
    model.train()
    for step in range(start + 1, tc.steps + 1):
        data_wait, losses = 0.0, []
        for micro in range(tc.grad_accum):
            t0 = time.perf_counter()
            batch = next(data)
            data_wait += time.perf_counter() - t0
            # reduce-scatter only on the last micro-batch; earlier ones accumulate locally (an unsharded model,
            # one process in fp32, has nothing to reduce)
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(micro == tc.grad_accum - 1)
            losses.append(forward_backward(model, enc, batch, cfg, D.device, step, D.rank, 1.0 / tc.grad_accum, itc))
        # an async save may still be copying weights, optimizer state and EMA: that must end before they change
        ckpt.staged()
        settle()  # the last step's, with this step's forward and backward already queued behind it
        pending = queue_step(model, opt, sched, cfg.optim.grad_clip, cfg, ema, step)
        if itc is not None:
            itc.step(pending.skip)
        if step == start + 1:  # every optimizer state exists now (the ITC head's too): pin the checkpoint buffers
            ckpt.prepare(model, opt, sched)
        loss = torch.stack(losses).mean()  # read only for a log row: a read waits for the device
        counters["samples_seen"] += tc.batch_size * tc.grad_accum * D.world_size
        thr.add(tc.batch_size * tc.grad_accum * D.world_size, data_wait)
        logging = step % cfg.log.interval == 0 or step == tc.steps
        evaluating = bool(cfg.eval.interval) and step % cfg.eval.interval == 0
        if settle_now or not pending.lagged or logging or evaluating:  # the row's norm and count, the grid's EMA
            settle()
        if logging:
            loss_val = mean_over_ranks(loss)
            row = {"loss": loss_val, "lr": sched.get_last_lr()[0], "grad_norm": gnorm if ok else None,
                   **thr.report(cfg.log.interval), **memory_stats(D.device), **data_counts(data, cfg),
                   "nonfinite_steps": counters["nonfinite_total"]}
            if itc is not None:  # the contrastive loss itself (chance: ln of the global batch), next to the flow loss
                row["itc_loss"] = float(itc.last)
            metrics.log(step, row)
            progress.update(step, row)
        if evaluating:
            _sample_grid(model, enc, cfg, run_dir, step, D, metrics, ema)
        _test_fault_hooks(step, D.rank)
        # a signal may reach one rank only (Slurm, kill): agree on it so every rank saves and exits together
        stopping = _any_rank(stop["signal"] is not None)
        if step % cfg.checkpoint.interval == 0 or step == tc.steps or stopping:
            settle()  # the checkpoint holds this step's EMA and non-finite count
            extra = {"data": data.state_dict(), **counters}
            ckpt.save(step, model, opt, sched, extra, async_ok=not (step == tc.steps or stopping))
        else:
            ckpt.poll()  # a finished async save is published now, not at the next save
        if stopping:
            loss_val = mean_over_ranks(loss)
            log.info(f"stop signal: checkpoint written at step {step}, exiting for a resume")
            metrics.event(step, "preempted")
            break
        prof.step(step)
    prof.close()
    ckpt.wait()
    flush(opt)  # the last step's update, before the sample grid's EMA swap or the LoRA export reads the weights
    if not stopping and (not cfg.eval.interval or tc.steps % cfg.eval.interval):
        _sample_grid(model, enc, cfg, run_dir, tc.steps, D, metrics, ema)
    if cfg.lora.enabled and not stopping:  # the adapters in the format FluxPipeline.load_lora_weights reads
        from fluxtrain import lora

        lora.save_lora(model, run_dir / "lora", ema=ema if cfg.ema.use_for_export else None)
    progress.close()
    metrics.close()
    return {"step": step, "loss": loss_val, "grad_norm": gnorm, "preempted": stopping}


def _any_rank(flag: bool) -> bool:
    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _test_fault_hooks(step: int, rank: int) -> None:
    """Fault injection for the resume tests (environment variables, off unless set): SIGKILL or SIGTERM this
    process at a step, on the first launch only (torchrun restarts count up TORCHELASTIC_RESTART_COUNT)."""
    env = os.environ
    if env.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or int(env.get("FLUXTRAIN_TEST_FAULT_RANK", "0")) != rank:
        return
    for var, sig in (("FLUXTRAIN_TEST_KILL_AT_STEP", signal.SIGKILL), ("FLUXTRAIN_TEST_TERM_AT_STEP", signal.SIGTERM)):
        if env.get(var) and int(env[var]) == step and not env.get("FLUXTRAIN_TEST_FAULT_DONE"):
            env["FLUXTRAIN_TEST_FAULT_DONE"] = "1"
            os.kill(os.getpid(), sig)


def _config_changes(resume, cfg: C.Config) -> list[str]:
    """The settings that differ from the checkpoint's own config.toml (none there: checkpoints before the copy)."""
    from fluxtrain.checkpoint import _fs

    fs, p = _fs(resume)
    try:
        return C.changes(fs.cat_file(f"{p}/config.toml"), cfg)
    except OSError:  # none there (FileNotFoundError), or unreadable: a note, never the end of a resume
        return []


def _reshard_data_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if k in ("pos", "skipped", "epoch")}


def _sample_grid(model, enc, cfg, run_dir: Path, step: int, D, metrics, ema=None) -> None:
    """All ranks run the (sharded) transformer; rank 0 decodes and writes samples/step-N.png."""
    import contextlib

    from fluxtrain.eval.grid import generate, save_grid
    from fluxtrain.lora import reshard

    model.eval()
    weights = ema.swap_into(model) if ema is not None and cfg.ema.use_for_samples else contextlib.nullcontext()
    guidance = cfg.model.guidance if model.config.guidance_embeds else None
    with weights:
        images = generate(model, enc.text, enc.vae, cfg.eval.prompts, cfg.data.resolution,
                          steps=cfg.eval.num_inference_steps, guidance=guidance, seed=cfg.eval.seed,
                          true_cfg=cfg.eval.true_cfg_scale)
        if cfg.eval.adherence_prompts:  # prompt following on the first N held-out prompts of each split
            from fluxtrain.data.prompts import read_prompts
            from fluxtrain.eval.evaluate import adherence

            folder = Path(__file__).resolve().parent / "eval" / "prompts"
            n = cfg.eval.adherence_prompts
            prompts = read_prompts(folder / "simple.txt")[:n] + read_prompts(folder / "complex.txt")[:n]
            score = adherence(model, enc.text, enc.vae, prompts, cfg.data.resolution, cfg.eval.num_inference_steps,
                              guidance, cfg.eval.seed, score=D.is_main, true_cfg=cfg.eval.true_cfg_scale)
            if D.is_main:
                metrics.event(step, "eval", adherence=score["overall"], n=score["n"],
                              adherence_simple=score["per_split"].get("simple", {}).get("pass"),
                              adherence_complex=score["per_split"].get("complex", {}).get("pass"))
    # a forward without backward leaves the root and last block gathered: shard them again before the optimizer
    # or a checkpoint looks at the parameters
    reshard(model)
    model.train()
    if D.is_main:
        out = run_dir / "samples" / f"step-{step:08d}.png"
        save_grid(images, cfg.eval.prompts, out)
        metrics.image(step, "samples", out)
