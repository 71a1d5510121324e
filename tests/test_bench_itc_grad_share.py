"""bench/itc_grad_share.py: ITC's part of the model's gradient, measured as the difference of two trainer steps on the
same batch (ITC weight 0 and w), must equal the gradient of the weighted ITC loss taken directly (ITCObjective.loss,
a separate forward of the empty-prompt copy); and a head fitted on frozen features learns."""

import math
from types import SimpleNamespace

import torch

from fluxtrain.config import Config
from tests.helpers import load_bench
from tests.test_itc import _itc_objective, _tiny_model


def _setup(b: int = 4, seed: int = 2):
    model = _tiny_model()
    cfg = Config()
    cfg.data.caption_dropout = 0.0
    c = model.config.in_channels // 4
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(b, c, 8, 8, generator=g)
    d, dp = model.config.joint_attention_dim, model.config.pooled_projection_dim
    seq, pooled = torch.randn(b, 6, d, generator=g), torch.randn(b, dp, generator=g)
    empty = (torch.randn(1, 6, d, generator=g), torch.randn(1, dp, generator=g))
    enc = SimpleNamespace(inputs=lambda batch: (mean, torch.zeros_like(mean), seq, pooled), empty=lambda: empty)
    return model, cfg, enc, pooled, empty


def test_the_itc_part_equals_the_weighted_itc_losss_own_gradient():
    gs = load_bench("itc_grad_share")
    model, cfg, enc, pooled, (e_seq, e_pooled) = _setup()
    itc = _itc_objective(model)  # weight 0.5
    batch = {"indices": torch.arange(4)}
    rows = gs.shares(model, enc, iter([batch]), cfg, torch.device("cpu"), itc, 1)
    # the direct path: the same inputs (recorded from the trainer's forward_backward), ITC's own loss, its gradient
    from fluxtrain.train import forward_backward

    seen = {}

    class Recorder:
        def forward(self, model, inputs, e_s, e_p, caption_pooled, view=None):
            seen["inputs"] = inputs
            return model(**inputs)[0], 0.0

    forward_backward(model, enc, batch, cfg, torch.device("cpu"), 0, 0, 1.0, Recorder())
    model.zero_grad(set_to_none=True)
    itc.loss(model, seen["inputs"], e_seq, e_pooled, pooled).backward()
    direct = gs.flat_grad([p for p in model.parameters() if p.requires_grad])
    r = rows[0]
    assert direct.norm() > 0 and math.isclose(r["itc_norm"], float(direct.norm()), rel_tol=1e-3)
    assert math.isclose(r["ratio"], r["itc_norm"] / r["flow_norm"]) and r["flow_norm"] > 0
    assert itc.weight == 0.5  # restored after the two passes


def test_a_head_fitted_on_frozen_features_learns():
    gs = load_bench("itc_grad_share")
    model, cfg, enc, _, _ = _setup(b=8)
    itc = _itc_objective(model)
    batches = iter([{"indices": torch.arange(8)}] * 2)
    before = [p.detach().clone() for p in model.parameters()]
    loss = gs.fit_head(model, enc, batches, cfg, torch.device("cpu"), itc, 200, 2, 1e-2)
    assert loss < 0.5 * math.log(8)  # chance is ln 8 = 2.08
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the model is left as it was
