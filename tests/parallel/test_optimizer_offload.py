"""parallel.optimizer_offload: AdamW's moments in host memory, each unit's update landing before its next forward.
One process without FSDP here (on the CPU the update is deferred to the unit's forward pre-hook, the ordering the GPU
enforces with stream events); the FSDP runs, resume and config refusals are in test_fsdp.py, test_checkpoint.py and
test_config.py."""

import copy

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


def make(device: str, offload: bool, max_norm: float = 0.05):
    kw = transformer_kwargs("tiny")
    model = build_transformer(kw, device="cpu")
    load_state_into(model, random_init_state(kw, 0))
    model.to(device)
    cfg = C.load(None, ["--optim.lr", "1e-3", "--optim.weight_decay", "0.1", "--parallel.optimizer_offload",
                        str(offload).lower(), "--optim.grad_clip", str(max_norm), "--train.device", device])
    opt = build_optimizer(model.parameters(), cfg.optim, model if offload else None)
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


def train(device: str, offload: bool, steps: int = 6, nan_step: int = 2):
    model, cfg, opt, sched = make(device, offload)
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


def step_once(model, opt, sched, cfg, step: int) -> None:
    model(**inputs(model, "cpu", step))[0].square().mean().backward()
    clip_and_step(model, opt, sched, cfg.optim.grad_clip, cfg, step=step)
    flush(opt)


def test_state_dict_round_trips_between_offloaded_and_plain_adamw():
    """A checkpoint of one loads into the other, and into an offloaded optimizer that has already stepped (whose
    host buffers must then take the loaded moments): the next step is the same for all."""
    _, opt, _, _ = train("cpu", True, steps=3, nan_step=-1)
    plain_model, cfg, plain, plain_sched = make("cpu", False)
    # deep copies, as a checkpoint gives: a loaded state dict's tensors are otherwise shared with their source
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    back_model, _, back, back_sched = make("cpu", True)
    step_once(back_model, back, back_sched, cfg, 0)  # moments of its own in its host buffers, replaced by the load
    back.load_state_dict(copy.deepcopy(plain.state_dict()))
    for k, st in back.state_dict()["state"].items():
        ref = opt.state_dict()["state"][k]
        assert int(st["step"]) == 3
        torch.testing.assert_close(st["exp_avg_sq"], ref["exp_avg_sq"], rtol=0, atol=0)
    back_model.load_state_dict(plain_model.state_dict())
    for model, o, sched in ((plain_model, plain, plain_sched), (back_model, back, back_sched)):
        step_once(model, o, sched, cfg, 5)
    for (name, a), b in zip(back_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
