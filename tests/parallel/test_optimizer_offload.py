"""parallel.optimizer_offload: AdamW's moments in host memory, each unit's update landing before its next forward.
One process without FSDP here (on the CPU the update is deferred to the unit's forward pre-hook, the ordering the GPU
enforces with stream events); the FSDP runs, resume and config refusals are in test_fsdp.py, test_checkpoint.py and
test_config.py."""

import copy
from pathlib import Path

import pytest
import torch

from fluxtrain import config as C
from fluxtrain import flow
from fluxtrain.models.flux import build_transformer, load_state_into, random_init_state
from fluxtrain.models.presets import transformer_kwargs
from fluxtrain.optim import build_optimizer, build_scheduler, flush
from fluxtrain.parallel.fsdp import blocks
from fluxtrain.train import clip_and_step
from tests.helpers import DEVICES


def make(device: str, offload: bool, max_norm: float = 0.05, buffer_gib: float = 0.0, dtype: str = "fp32"):
    kw = transformer_kwargs("tiny")
    model = build_transformer(kw, device="cpu")
    load_state_into(model, random_init_state(kw, 0))
    model.to(device)
    cfg = C.load(None, ["--optim.lr", "1e-3", "--optim.weight_decay", "0.1", "--parallel.optimizer_offload",
                        str(offload).lower(), "--optim.grad_clip", str(max_norm), "--train.device", device,
                        "--parallel.optimizer_offload_buffer_gib", str(buffer_gib)]
                  + (["--parallel.optimizer_offload_dtype", dtype] if offload else []))
    opt = build_optimizer(model.parameters(), cfg.optim, model if offload else None, cfg.parallel)
    return model, cfg, opt, build_scheduler(opt, 10, cfg.optim)


def inputs(model, device: str, step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    c = model.config
    x = torch.randn(2, 16, c.in_channels, generator=g)
    seq = torch.randn(2, 8, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    sigma = torch.rand(2, generator=g)
    guidance = 1.0 if c.guidance_embeds else None
    return {k: v.to(device) if torch.is_tensor(v) else v
            for k, v in flow.transformer_inputs(x, sigma, seq, pooled, 8, 8, guidance).items()}


def train(device: str, offload: bool, steps: int = 6, nan_step: int = 2, buffer_gib: float = 0.0, dtype: str = "fp32"):
    model, cfg, opt, sched = make(device, offload, buffer_gib=buffer_gib, dtype=dtype)
    if offload and device == "cuda":
        with torch.cuda.stream(opt._h2d):  # an update that read its moments before they arrived would go NaN
            opt._buf.fill_(float("nan"))
    losses, oks = [], []
    for step in range(steps):
        loss = model(**inputs(model, device, step))[0].square().mean()
        losses.append(float(loss.detach()))
        (loss * (float("nan") if step == nan_step else 1.0)).backward()
        _, ok = clip_and_step(model, opt, sched, cfg.optim.grad_clip, cfg, step=step)
        oks.append(ok)
    flush(opt)
    return model, opt, losses, oks


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_adamw_equals_fused_adamw_with_clip_and_skip(device):
    ref_model, ref_opt, ref_losses, ref_ok = train(device, False)
    model, opt, losses, ok = train(device, True)
    assert ok == ref_ok == [True, True, False, True, True, True]
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {5}  # the skipped step is not counted
    for k in ref_state:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[k][key].cpu(), ref_state[k][key].cpu(), rtol=1e-6, atol=1e-9)
    for p in model.parameters():  # the moments live on the host
        assert opt.state[p]["exp_avg"].device.type == "cpu"
        assert opt.state[p]["exp_avg"].is_pinned() == (device == "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("buffer_gib, staged", [(0.012, "some"), (1.0, "all")])
def test_a_larger_ring_copies_the_next_steps_moments_in_early_and_stays_exact(buffer_gib, staged):
    ref_model, _, ref_losses, _ = train("cuda", False)
    model, opt, losses, _ = train("cuda", True, buffer_gib=buffer_gib)
    early = [s is not None for s in opt._staged]
    assert early[0] and (all(early) if staged == "all" else not all(early))
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_the_first_updates_wait_for_the_step_counts_they_increment(monkeypatch):
    """A first step makes each parameter's step count (zeros on the compute stream); the update stream must not read
    them before that runs. The compute stream is held back before each unit's counts are made, over freed scalars
    full of NaN whose memory the counts are likely to reuse."""
    from fluxtrain.parallel.optimizer_offload import OffloadedAdamW

    home = OffloadedAdamW._home

    def late(self, j):
        torch.cuda._sleep(20_000_000)
        home(self, j)

    ref_model, _, ref_losses, _ = train("cuda", False)
    monkeypatch.setattr(OffloadedAdamW, "_home", late)
    junk = [torch.full((), float("nan"), device="cuda") for _ in range(8192)]
    del junk
    model, _, losses, _ = train("cuda", True)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_each_unit_updates_before_its_own_forward_and_not_earlier():
    model, cfg, opt, sched = make("cpu", True, max_norm=0.0)
    model(**inputs(model, "cpu", 0))[0].square().mean().backward()
    clip_and_step(model, opt, sched, 0.0, cfg)
    first = blocks(model)[0]
    before = {n: p.detach().clone() for n, p in first.named_parameters()}
    seen = {}
    # a hook registered after the optimizer's runs after it: the block's weights as its forward sees them
    first.register_forward_pre_hook(lambda m, a: seen.update({n: p.detach().clone() for n, p in m.named_parameters()}))
    assert all(torch.equal(p, before[n]) for n, p in first.named_parameters())  # queued, not applied yet
    with torch.no_grad():
        model(**inputs(model, "cpu", 1))
    assert seen and all(not torch.equal(seen[n], before[n]) for n in before)  # applied by the time it ran


def step_once(model, opt, sched, cfg, step: int, device: str = "cpu") -> None:
    model(**inputs(model, device, step))[0].square().mean().backward()
    clip_and_step(model, opt, sched, cfg.optim.grad_clip, cfg, step=step)
    flush(opt)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trips_between_offloaded_and_plain_adamw(device):
    """A checkpoint of one loads into the other, and into an offloaded optimizer that has already stepped (whose
    host buffers must then take the loaded moments; on a GPU its ring holds every unit, so the next step's moments
    were copied in early and must be dropped): the next step is the same for all."""
    _, opt, _, _ = train(device, True, steps=3, nan_step=-1)
    plain_model, cfg, plain, plain_sched = make(device, False)
    # deep copies, as a checkpoint gives: a loaded state dict's tensors are otherwise shared with their source
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    back_model, _, back, back_sched = make(device, True, buffer_gib=1.0)
    step_once(back_model, back, back_sched, cfg, 0, device)  # moments of its own, replaced by the load
    assert device == "cpu" or all(s is not None for s in back._staged)
    back.load_state_dict(copy.deepcopy(plain.state_dict()))
    for k, st in back.state_dict()["state"].items():
        ref = opt.state_dict()["state"][k]
        assert int(st["step"]) == 3
        torch.testing.assert_close(st["exp_avg_sq"], ref["exp_avg_sq"], rtol=0, atol=0)
    back_model.load_state_dict(plain_model.state_dict())
    for model, o, sched in ((plain_model, plain, plain_sched), (back_model, back, back_sched)):
        step_once(model, o, sched, cfg, 5, device)
    for (name, a), b in zip(back_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_stochastic_rounding_keeps_the_expectation_where_rounding_to_nearest_freezes():
    from fluxtrain.parallel.optimizer_offload import round_to_bf16

    ulp = 2.0**-7  # bf16's step at 1
    x = torch.full((8192,), 1 + 0.3 * ulp)
    out = torch.empty(8192, dtype=torch.bfloat16)
    round_to_bf16(x, out, torch.tensor(5.0))
    assert set(out.float().unique().tolist()) == {1.0, 1 + ulp}
    assert abs(out.float().mean().item() - x[0].item()) < 0.03 * ulp
    # AdamW's second moment: v <- 0.999 v + 0.001 g^2 grows 0.1% a step from 1 towards g^2 = 2, under bf16's half step
    v_sr = v_rtn = torch.ones(512, dtype=torch.bfloat16)
    v32 = 1.0
    for step in range(2000):
        v32 = 0.999 * v32 + 0.001 * 2.0
        nxt = 0.999 * v_sr.float() + 0.001 * 2.0
        v_sr = torch.empty_like(v_sr)
        round_to_bf16(nxt, v_sr, torch.tensor(float(step)))
        v_rtn = (0.999 * v_rtn.float() + 0.001 * 2.0).to(torch.bfloat16)
    assert v_rtn.float().max().item() == 1.0  # rounding to nearest never moves
    assert v_sr.float().mean().item() == pytest.approx(v32, rel=5e-3)  # 1.865


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_moments_halve_the_host_bytes_and_track_fp32_adamw(device):
    ref_model, _, ref_losses, ref_ok = train(device, False, steps=10)
    _, fp32, _, _ = train(device, True, steps=10)
    model, opt, losses, ok = train(device, True, steps=10, dtype="bf16")
    assert ok == ref_ok
    assert all(f.dtype == torch.bfloat16 for f in opt._flat)
    assert sum(f.nbytes for f in opt._flat) * 2 == sum(f.nbytes for f in fp32._flat)
    assert losses == pytest.approx(ref_losses, rel=2e-3)
    assert losses != pytest.approx(ref_losses, rel=1e-6, abs=0)  # not exact AdamW: the moments were rounded
    for p in model.parameters():
        assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_moments_resume_as_the_uninterrupted_run(device):
    """The rounding's random bits come from the values, their place and the step count: a run resumed from a state
    dict rounds, and so updates, exactly as the one that went on."""
    model, opt, _, _ = train(device, True, steps=3, nan_step=-1, dtype="bf16")
    back_model, cfg, back, back_sched = make(device, True, dtype="bf16")
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    back_model.load_state_dict(model.state_dict())
    sched = build_scheduler(opt, 10, cfg.optim)
    for step in (5, 6):
        step_once(model, opt, sched, cfg, step, device)
        step_once(back_model, back, back_sched, cfg, step, device)
    for (name, a), b in zip(back_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


class _Event:  # stands in for a CUDA event in the ring's bookkeeping
    def __init__(self, name):
        self.name = name


def test_ring_hands_out_regions_in_order_and_waits_only_for_released_ones():
    from fluxtrain.parallel.optimizer_offload import Ring

    ring = Ring(10)
    a, wa = ring.alloc(4)
    b, wb = ring.alloc(4)
    assert (a[:2], b[:2], wa, wb) == ([0, 4], [4, 8], [], [])
    assert not ring.fits(4)  # wraps to 0, over a, which is still in flight
    with pytest.raises(RuntimeError, match="in flight"):
        ring.alloc(4)
    a[2] = _Event("a out")
    assert ring.fits(4)
    c, wc = ring.alloc(4)  # 8 + 4 > 10: wraps to the start and waits for a's copy out only
    assert c[:2] == [0, 4] and [e.name for e in wc] == ["a out"]
    b[2] = _Event("b out")
    d, wd = ring.alloc(6)  # after c: [4, 10) overlaps b only
    assert d[:2] == [4, 10] and [e.name for e in wd] == ["b out"]
    with pytest.raises(ValueError, match="larger than"):
        ring.alloc(11)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_fsdp_all_gathers_wait_for_each_blocks_offloaded_update_on_gpus(tmp_path):
    from tests.helpers import assert_close, losses, torchrun

    res = torchrun(2, [str(Path(__file__).parent / "offload_gpu_worker.py"), str(tmp_path)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for name in ("offload", "offload_ring", "offload_all"):
        assert_close(losses(tmp_path / name), losses(tmp_path / "plain"), 1e-6, name)
    assert_close(losses(tmp_path / "offload_bf16"), losses(tmp_path / "plain"), 2e-3, "offload_bf16")
    assert_close(losses(tmp_path / "offload_bf16_all"), losses(tmp_path / "offload_bf16"), 1e-6, "offload_bf16_all")


GATHER_STREAMS = """
import os, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from fluxtrain.parallel.optimizer_offload import _gather_streams
dist.init_process_group("gloo", rank=0, world_size=1)
plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
fully_shard(model[0]); fully_shard(model)
model(torch.ones(2, 4))  # FSDP2 makes its streams in the root's first forward
print(len(_gather_streams([plain])), len(_gather_streams([model])), flush=True)
dist.destroy_process_group()
"""


def test_fsdp_all_gather_streams_are_found_in_this_torch():
    """The hook waits FSDP2's all-gather streams through private attributes: a torch that moves them must fail here
    (and at run time) instead of silently racing."""
    import subprocess
    import sys

    from tests.helpers import ROOT, env, free_port

    res = subprocess.run([sys.executable, "-c", GATHER_STREAMS], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["0", "2"]


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA")
def test_pinned_moments_take_their_bytes_not_the_next_power_of_two():
    """torch's pinned allocator would take 512 MiB for these 256 MiB (it rounds up to a power of two), and 12B's fp32
    moments needed 152 GiB of page-locked memory for 89 GiB: more than the host had."""
    from fluxtrain.pinned import pinned_zeros

    n = 2**27 + 8  # bf16: 256 MiB and 16 bytes
    before = _rss()
    host = pinned_zeros(n, torch.bfloat16, True)
    grown = _rss() - before
    assert host.is_pinned() and host.numel() == n and host.dtype == torch.bfloat16
    assert 0.95 * 2**28 < grown < 1.2 * 2**28, grown / 2**20  # the pages are touched (locked), and only those
    assert not host.any()
    src = torch.randn(n, device="cuda").to(torch.bfloat16)
    host.copy_(src, non_blocking=True)  # asynchronous only from page-locked memory
    torch.cuda.synchronize()
    assert torch.equal(host, src.cpu())


def test_memory_that_cannot_be_page_locked_is_refused_in_one_line_with_the_way_out(monkeypatch):
    from fluxtrain.pinned import pinned_zeros

    class Cudart:  # the host refuses: what cudaHostRegister answers when it can't lock the pages
        @staticmethod
        def cudaHostRegister(ptr, nbytes, flags):
            return 2  # cudaErrorMemoryAllocation

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart)
    with pytest.raises(RuntimeError) as err:
        pinned_zeros(2**28, torch.float32, True)  # 1 GiB, never touched (calloc)
    msg = str(err.value)
    assert "\n" not in msg and "could not page-lock 1.0 GiB" in msg and "CUDA error 2" in msg
    assert "--parallel.optimizer_offload_dtype bf16" in msg
