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


def test_a_norm_read_a_step_late_gives_the_same_weights_ema_and_norms():
    """queue_step: the host reads a step's norm (and folds its weights into the EMA) only after the next step's
    forward and backward, as the trainer does; the weights, the EMA and the (norm, ok) of every step must equal those
    of settling each step at once, a non-finite step included."""
    from fluxtrain.ema import EMA
    from fluxtrain.train import queue_step

    def loop(lag: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
        cfg = C.load(None, ["--optim.lr", "1e-2"])
        opt, ema = build_optimizer(model.parameters(), cfg.optim), EMA(model, decay=0.5)
        sched = build_scheduler(opt, 10, cfg.optim)
        x, out, pending = torch.randn(8, 16), [], None
        for step in range(1, 7):
            (model(x).square().mean() * (float("nan") if step == 3 else 10.0)).backward()
            if lag and pending is not None:
                out.append(pending.settle())
            pending = queue_step(model, opt, sched, 0.5, cfg, ema, step)
            assert pending.lagged  # a plain fused AdamW
            if not lag:
                out.append(pending.settle())
        if lag:
            out.append(pending.settle())
        return [p.detach().clone() for p in model.parameters()], [t.clone() for t in ema.shadow.values()], out

    (w1, e1, n1), (w2, e2, n2) = loop(True), loop(False)
    assert [ok for _, ok in n1] == [ok for _, ok in n2] == [True, True, False, True, True, True]
    assert [n for n, ok in n1 if ok] == [n for n, ok in n2 if ok]
    assert all(torch.equal(a, b) for a, b in zip(w1 + e1, w2 + e2))
    assert not all(torch.equal(a, b) for a, b in zip(w1, e1))  # the EMA lags the weights: a real check


def test_the_trainer_settles_a_step_late_with_the_same_run(tmp_path):
    """The trainer queues step k+1's forward and backward before it reads step k's norm. With EMA, a non-finite
    step and log rows only every 4 steps (so most steps settle late), the checkpoint's weights and EMA, the log rows
    and the non-finite event equal a run that settles every step (FLUXTRAIN_TEST_SETTLE_EVERY_STEP)."""
    import torch.distributed.checkpoint as dcp

    from tests.helpers import FAST, events, fluxtrain, metrics

    runs = {}
    for name, env in (("late", {}), ("each", {"FLUXTRAIN_TEST_SETTLE_EVERY_STEP": "1"})):
        run = tmp_path / name
        res = fluxtrain(["train", "--config", "configs/tiny.toml", *FAST, "--train.steps", "8", "--log.interval", "4",
                         "--ema.enabled", "true", "--ema.decay", "0.5", "--train.inject_nan_at_step", "3",
                         "--train.output_dir", str(run)], extra_env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = run
    rows = {k: [{f: r.get(f) for f in ("step", "loss", "grad_norm", "nonfinite_steps")} for r in metrics(run)
                if "event" not in r] for k, run in runs.items()}
    assert rows["late"] == rows["each"] and [r["step"] for r in rows["late"]] == [4, 8]
    steps = {k: [e["step"] for e in events(run, "nonfinite")] for k, run in runs.items()}
    assert steps["late"] == steps["each"] == [3]
    ckpts = {k: run / "checkpoints" / "step-00000008" for k, run in runs.items()}
    states = {}
    for k, ck in ckpts.items():
        meta = dcp.FileSystemReader(str(ck)).read_metadata()
        want = {n: torch.empty(m.size, dtype=m.properties.dtype) for n, m in meta.state_dict_metadata.items()
                if n.startswith(("model.", "ema.")) and hasattr(m, "size")}
        dcp.load(want, checkpoint_id=str(ck), no_dist=True)
        states[k] = want
    assert states["late"].keys() == states["each"].keys() and any(n.startswith("ema.") for n in states["late"])
    assert all(torch.equal(states["late"][n], states["each"][n]) for n in states["late"])
