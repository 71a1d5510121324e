"""One process, no FSDP: the fused optimizer's in-kernel clip and skip (`grad_scale`, `found_inf`) equal clipping the
gradients and not calling the optimizer, on the CPU and, where there is one, on a GPU (the pinned-copy norm read)."""

import math

import pytest
import torch

from fluxtrain import config as C
from fluxtrain.optim import build_optimizer, build_scheduler
from fluxtrain.train import clip_and_step
from tests.helpers import DEVICES


def run(device: str, fused: bool, max_norm: float) -> tuple[list[torch.Tensor], list[float], list[bool], set]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device)
    cfg = C.load(None, ["--optim.fused", str(fused).lower(), "--optim.lr", "1e-2"])
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = build_scheduler(opt, 10, cfg.optim)
    x = torch.randn(8, 16, device=device)
    norms, oks = [], []
    for step in range(6):
        loss = model(x).square().mean() * (float("nan") if step == 2 else 10.0)  # step 2: a non-finite gradient
        loss.backward()
        norm, ok = clip_and_step(model, opt, sched, max_norm, cfg, step=step)
        norms.append(norm)
        oks.append(ok)
    steps = {int(s["step"]) for s in opt.state_dict()["state"].values()}
    return [p.detach().cpu().clone() for p in model.parameters()], norms, oks, steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_norm", [0.5, 0.0])
def test_fused_clip_and_skip_equal_the_unfused_ones(device, max_norm):
    fused_p, fused_n, fused_ok, fused_s = run(device, True, max_norm)
    plain_p, plain_n, plain_ok, plain_s = run(device, False, max_norm)
    assert fused_ok == plain_ok == [True, True, False, True, True, True]
    assert math.isnan(fused_n[2]) and all(n > max_norm for i, n in enumerate(fused_n) if i != 2)  # the clip acts
    assert fused_s == plain_s == {5}  # the skipped step is not counted (Adam's bias correction)
    for a, b in zip(fused_p, plain_p):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
