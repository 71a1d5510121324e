"""ITC auxiliary loss: matched < shuffled, gradients reach the head and the captured block output, hook leaves the
model alone, and the 2-rank gather gives the single-process loss and (rank-averaged) gradients."""

import json
import textwrap

import pytest
import torch

from fluxtrain import flow
from fluxtrain.itc import ITCHead, capture_block_output, head_for, itc_loss, pooled_image_features
from tests.helpers import torchrun


def _pairs(n=16, d_img=32, d_txt=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=g)
    img = latent @ torch.randn(8, d_img, generator=g) + 0.1 * torch.randn(n, d_img, generator=g)
    txt = latent @ torch.randn(8, d_txt, generator=g) + 0.1 * torch.randn(n, d_txt, generator=g)
    return img, txt


def test_matched_lower_than_shuffled_after_fitting():
    torch.manual_seed(0)
    img, txt = _pairs()
    head = ITCHead(32, 24, proj_dim=16)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(60):
        loss = itc_loss(head, img, txt, gather=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    perm = torch.roll(torch.arange(16), 5)
    with torch.no_grad():
        matched = itc_loss(head, img, txt, gather=False).item()
        shuffled = itc_loss(head, img, txt[perm], gather=False).item()
    assert matched < 0.5 * shuffled, (matched, shuffled)
    assert matched < torch.log(torch.tensor(16.0)).item() < shuffled


def test_temperature_init_and_valid_mask():
    head = ITCHead(8, 8, proj_dim=4)
    assert abs(1 / head.scale().item() - 0.07) < 1e-6
    assert "logit_scale" in head.no_weight_decay()
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    valid = torch.tensor([True, False, True, True])
    c = itc_loss(head, img, txt, gather=False, valid=valid)
    d = itc_loss(head, img[valid], txt[valid], gather=False)
    assert c.item() == pytest.approx(d.item())
    z = itc_loss(head, img, txt, gather=False, valid=torch.tensor([True, False, False, False]))
    assert z.item() == 0.0 and z.requires_grad


def _tiny_model():
    from fluxtrain.models.flux import build_transformer, init_weights
    from fluxtrain.models.presets import transformer_kwargs

    model = build_transformer("tiny", device="cpu")
    init_weights(model, transformer_kwargs("tiny"), seed=0)
    return model


def _forward(model, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = 8  # 8×8 latent → 16 image tokens
    x = flow.pack(torch.randn(b, model.config.in_channels // 4, lat, lat, generator=g))
    seq = torch.randn(b, 6, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(b, model.config.pooled_projection_dim, generator=g)
    sigma = torch.rand(b, generator=g)
    out = model(**flow.transformer_inputs(x, sigma, seq, pooled, lat, lat, 3.5))[0]
    return out, pooled, x.shape[1]


@pytest.mark.parametrize("kind,index", [("single", 1), ("double", -1)])
def test_capture_hook_gradients_reach_head_and_block(kind, index):
    model = _tiny_model()
    keys = set(model.state_dict())
    cap = capture_block_output(model, index, kind=kind)
    out, pooled, n_img = _forward(model)
    feats = cap.pop()
    assert feats.shape == (4, n_img, 128) and feats.requires_grad and cap.calls == 1
    feats.retain_grad()
    head = head_for(model, text_dim=pooled.shape[1], proj_dim=32)
    loss = itc_loss(head, pooled_image_features(feats), pooled, gather=False)
    loss.backward()  # the ITC term alone
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert head.logit_scale.grad.abs() > 0
    blocks = model.single_transformer_blocks if kind == "single" else model.transformer_blocks
    assert sum(p.grad.abs().sum() for p in blocks[index].parameters() if p.grad is not None) > 0
    assert model.x_embedder.weight.grad.abs().sum() > 0  # ... and the layers below it
    assert model.proj_out.weight.grad is None  # ... but not the layers above it
    # Hook is external: same parameters/state_dict keys; disabled → nothing stored; removed → gone.
    assert set(model.state_dict()) == keys
    cap.enabled = False
    with torch.no_grad():
        _forward(model)
    assert cap.features is None
    cap.remove()
    assert not blocks[index]._forward_hooks


_DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, os.environ["PYTHONPATH"])
    from tests.test_itc import _dist_case
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    out = _dist_case(r, w)
    # Data-parallel convention: the gradient used for the step is the average over ranks.
    for k, g in out["grads"].items():
        dist.all_reduce(g)
        g /= w
    if r == 0:
        json.dump({"loss": out["loss"], "grads": {k: v.tolist() for k, v in out["grads"].items()}},
                  open(sys.argv[1] + f"/rank{r}.json", "w"))
    else:
        json.dump({"loss": out["loss"]}, open(sys.argv[1] + f"/rank{r}.json", "w"))
    dist.destroy_process_group()
""")


def _dist_case(rank: int, world: int, n_per_rank: int = 6):
    """A shared 'backbone' Linear (standing in for the transformer) → pooled image features; this rank's slice
    of a global batch of world × n_per_rank pairs (world=1: the whole batch). Returns loss and grads."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(20, 32)
    head = ITCHead(32, 24, proj_dim=16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * n_per_rank, 5, 20, generator=g)  # global batch (2 ranks' worth) of 5 'tokens'
    txt = torch.randn(2 * n_per_rank, 24, generator=g)
    valid = torch.ones(2 * n_per_rank, dtype=torch.bool)
    valid[[2, 8]] = False  # one masked row on each rank (a dropped caption)
    lo, hi = (rank * n_per_rank, (rank + 1) * n_per_rank) if world > 1 else (0, 2 * n_per_rank)
    feats = pooled_image_features(backbone(x[lo:hi]))
    loss = itc_loss(head, feats, txt[lo:hi], gather=True, valid=valid[lo:hi])
    loss.backward()
    grads = {f"backbone.{k}": p.grad.clone() for k, p in backbone.named_parameters()}
    grads.update({f"head.{k}": p.grad.clone() for k, p in head.named_parameters()})
    return {"loss": loss.item(), "grads": grads}


def test_two_rank_gather_matches_single_process(tmp_path):
    script = tmp_path / "itc_dist.py"
    script.write_text(_DIST_SCRIPT)
    res = torchrun(2, [str(script), str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    single = _dist_case(0, 1)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert r1["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for k, g in single["grads"].items():
        assert torch.allclose(torch.tensor(r0["grads"][k]), g, rtol=1e-4, atol=1e-6), k
    # Without the gather each rank would see only its own half: a different (smaller-batch) loss.
    assert r0["loss"] != pytest.approx(_local_only_loss(), rel=1e-3)


def _local_only_loss():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(20, 32)
    head = ITCHead(32, 24, proj_dim=16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, 20, generator=g)
    txt = torch.randn(12, 24, generator=g)
    return itc_loss(head, pooled_image_features(backbone(x[:6])), txt[:6], gather=False).item()


def _itc_objective(model):
    from types import SimpleNamespace

    from fluxtrain.config import OptimConfig
    from fluxtrain.itc import ITCObjective

    torch.manual_seed(3)
    return ITCObjective(model, SimpleNamespace(size=lambda: 1), model.config.pooled_projection_dim, 0.5,
                        OptimConfig(), 10, torch.device("cpu"))


def _itc_batch(model, seed: int, b: int = 4, lat: int = 8):
    """Transformer inputs of b random samples (8×8 latents, 6 text tokens), their pooled text, and an empty prompt."""
    g = torch.Generator().manual_seed(seed)
    d, dp = model.config.joint_attention_dim, model.config.pooled_projection_dim
    x = flow.pack(torch.randn(b, model.config.in_channels // 4, lat, lat, generator=g))
    seq, pooled = torch.randn(b, 6, d, generator=g), torch.randn(b, dp, generator=g)
    inputs = flow.transformer_inputs(x, torch.rand(b, generator=g), seq, pooled, lat, lat, 3.5)
    return inputs, pooled, torch.randn(1, 6, d, generator=g), torch.randn(1, dp, generator=g)


def test_joint_forward_matches_two_forwards():
    """The trainer's one forward of [batch; batch with the empty prompt] gives the prediction, ITC loss and gradients
    of the two separate forwards, in one pass over the model; an empty prompt of another length falls back to two."""
    model = _tiny_model()
    itc = _itc_objective(model)
    inputs, pooled, e_seq, e_pooled = _itc_batch(model, seed=5)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))

    def run(joint: bool, e_seq: torch.Tensor):
        model.zero_grad(set_to_none=True)
        itc.head.zero_grad(set_to_none=True)
        calls.clear()
        if joint:
            pred, aux = itc.forward(model, inputs, e_seq, e_pooled, pooled)
        else:
            pred, aux = model(**inputs)[0], itc.loss(model, inputs, e_seq, e_pooled, pooled)
        (pred.square().mean() + aux).backward()
        named = list(model.named_parameters()) + [(f"head.{k}", p) for k, p in itc.head.named_parameters()]
        return pred.detach(), aux.item(), {k: p.grad.clone() for k, p in named if p.grad is not None}, len(calls)

    (p1, a1, g1, n1), (p2, a2, g2, n2) = run(True, e_seq), run(False, e_seq)
    assert (n1, n2) == (1, 2)
    assert torch.allclose(p1, p2, atol=1e-5)
    assert a1 == pytest.approx(a2, rel=1e-5) and a1 > 0
    assert g1.keys() == g2.keys() and "head.img_proj.1.weight" in g1
    for k in g1:
        assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6), k
    # The ITC loss is the empty-prompt half's: the captioned half's features give another value.
    itc._captured(model, inputs)
    assert itc._loss(pooled_image_features(itc.capture.pop()), pooled).item() != pytest.approx(a1, rel=1e-4)
    # A shorter empty prompt can't join the batch: two forwards, same numbers as the explicit two.
    short = e_seq[:, :3]
    (p3, a3, _, n3), (_, a4, _, _) = run(True, short), run(False, short)
    assert n3 == 2 and torch.allclose(p3, p2, atol=1e-6) and a3 == pytest.approx(a4, rel=1e-6)


def test_joint_forward_under_per_block_compile_matches_eager():
    """The ITC arms train with per-block torch.compile: the capture hook then runs inside the compiled blocks, on a
    batch of 2B. Prediction, ITC loss and gradients match the eager model's."""
    from fluxtrain.parallel.compile import apply_compile

    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = _tiny_model()
        if compiled:
            apply_compile(model)
        itc = _itc_objective(model)
        inputs, pooled, e_seq, e_pooled = _itc_batch(model, seed=7)
        pred, aux = itc.forward(model, inputs, e_seq, e_pooled, pooled)
        (pred.square().mean() + aux).backward()
        results.append((pred.detach(), aux.item(), itc.capture.calls, itc.head.img_proj[1].weight.grad.clone(),
                        model.x_embedder.weight.grad.clone()))
    (p0, a0, c0, h0, x0), (p1, a1, c1, h1, x1) = results
    assert c0 == c1 == 1
    assert torch.allclose(p0, p1, atol=1e-4) and a1 == pytest.approx(a0, rel=1e-4)
    assert torch.allclose(h0, h1, rtol=1e-3, atol=1e-5) and torch.allclose(x0, x1, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_itc_sigma_scale_gives_the_itc_copy_a_lower_noise_level(scale):
    """train.itc_sigma_scale: the trainer hands ITC its copy of the batch at σ·scale on the line from the clean
    latents to the same noise (1: no view, the flow loss's own x_t); the flow loss's inputs are unchanged."""
    from types import SimpleNamespace

    from fluxtrain.config import Config
    from fluxtrain.train import forward_backward

    model = _tiny_model()
    cfg = Config()
    cfg.train.itc_sigma_scale, cfg.data.caption_dropout = scale, 0.0
    b, c = 4, model.config.in_channels // 4
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(b, c, 8, 8, generator=g)
    d, dp = model.config.joint_attention_dim, model.config.pooled_projection_dim
    seq, pooled = torch.randn(b, 6, d, generator=g), torch.randn(b, dp, generator=g)
    enc = SimpleNamespace(inputs=lambda _b: (mean, torch.zeros_like(mean), seq, pooled),  # std 0: x0 is the mean
                          empty=lambda: (torch.zeros(1, 6, d), torch.zeros(1, dp)))
    seen = {}

    class Recorder:  # stands in for ITCObjective: what the trainer hands it
        def forward(self, model, inputs, e_seq, e_pooled, caption_pooled, view=None):
            seen.update(inputs=inputs, view=view)
            return model(**inputs)[0], inputs["hidden_states"].sum() * 0.0

    forward_backward(model, enc, {"indices": torch.arange(b)}, cfg, torch.device("cpu"), 0, 0, 1.0, Recorder())
    inputs, view = seen["inputs"], seen["view"]
    if scale == 1.0:
        assert view is None
        return
    sigma, x0 = inputs["timestep"], flow.pack(mean)
    assert torch.allclose(view["timestep"], sigma * scale)
    s = sigma.view(-1, 1, 1)
    noise = (inputs["hidden_states"] - (1 - s) * x0) / s  # the flow loss's noise, recovered from its x_t
    assert torch.allclose(view["hidden_states"], (1 - s * scale) * x0 + s * scale * noise, atol=1e-5)
    assert not torch.allclose(view["hidden_states"], inputs["hidden_states"], atol=1e-3)


def test_a_view_sets_the_itc_copys_inputs_and_leaves_the_prediction():
    """ITCObjective.forward with a view: the captioned half's prediction is the model's on `inputs`; the ITC loss is
    that of the empty-prompt forward at the view's latents and timestep (joint and separate forwards agree)."""
    model = _tiny_model()
    itc = _itc_objective(model)
    inputs, pooled, e_seq, e_pooled = _itc_batch(model, seed=9)
    view = dict(hidden_states=inputs["hidden_states"] * 0.5, timestep=inputs["timestep"] * 0.5)
    with torch.no_grad():
        p0, a0 = itc.forward(model, inputs, e_seq, e_pooled, pooled)
        p1, a1 = itc.forward(model, inputs, e_seq, e_pooled, pooled, view)
        a2 = itc.loss(model, inputs, e_seq, e_pooled, pooled, view)
    assert torch.allclose(p0, p1, atol=1e-5)
    assert a1.item() == pytest.approx(a2.item(), rel=1e-5)
    assert a1.item() != pytest.approx(a0.item(), rel=1e-4)


def test_the_log_rows_carry_the_unweighted_itc_loss(tmp_path):
    """With train.itc_weight every log row has itc_loss: the contrastive loss itself, not its weighted share (a
    fresh head's loss is near chance, ln 4 = 1.39 for a batch of 4; weighted by 0.1 it would read ~0.14). Without
    ITC the key is absent."""
    import math

    from tests.helpers import FAST, fluxtrain, losses, metrics

    for itc, out in ((0.1, tmp_path / "itc"), (0.0, tmp_path / "plain")):
        res = fluxtrain(["train", "--config", "configs/tiny.toml", *FAST, "--train.steps", "3",
                         "--train.batch_size", "4", "--train.itc_weight", str(itc), "--train.output_dir", str(out)])
        assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in metrics(tmp_path / "itc") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.5 * math.log(4) < r["itc_loss"] < 2 * math.log(4) for r in rows), [r["itc_loss"] for r in rows]
    assert len(losses(tmp_path / "plain")) == 3
    assert not any("itc_loss" in r for r in metrics(tmp_path / "plain"))
